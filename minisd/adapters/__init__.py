"""Small networks added to a frozen model: LoRA and ControlNet (their modules, files and hooks)."""
