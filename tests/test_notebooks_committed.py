"""The committed notebooks read well on the web: executed, in order, with their pictures.

CI re-executes every notebook under nbval, which checks that the cells run but not what was committed;
these tests check the committed files themselves. (A re-execution with MPLBACKEND=Agg in the
environment once dropped every matplotlib figure from twelve notebooks without any test noticing.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").rglob("*.ipynb"))
NOTEBOOKS = [p for p in NOTEBOOKS if ".ipynb_checkpoints" not in p.parts]
NEEDS_WEIGHTS = {"14_real_sd15.ipynb", "14_real_sd15_solutions.ipynb"}  # run their cells only with real SD 1.5 weights and a GPU
DRAWS = re.compile(r"(^|[^\w.])show\(|plt\.show\(")


def cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"])


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2 * 15 - 1  # 00-14 and their solutions (14 has none)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_executed_in_order_without_errors(path):
    code = [c for c in cells(path) if source(c).strip()]
    counts = [c["execution_count"] for c in code]
    assert None not in counts, f"{path.name}: cells never executed: {[i for i, n in enumerate(counts) if n is None]}"
    assert counts == sorted(counts), f"{path.name}: executed out of order: {counts}"
    errors = [o.get("ename") for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{path.name}: committed with errors {errors}"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in NEEDS_WEIGHTS], ids=lambda p: p.name)
def test_every_figure_is_committed(path):
    """Each cell that draws (minisd.viz.show / plt.show) carries its picture, except a live widget's."""
    missing = [i for i, c in enumerate(cells(path))
               if DRAWS.search(source(c)) and "interact(" not in source(c)
               and not any("image/png" in o.get("data", {}) for o in c["outputs"])]
    assert not missing, f"{path.name}: code cells {missing} draw a figure but have no picture committed"
