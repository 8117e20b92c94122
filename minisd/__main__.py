"""`python -m minisd ...` is `minisd ...`."""

import sys

from .cli import main

sys.exit(main())
