"""The networks of Stable Diffusion 1.x, each in one file with a frozen dataclass config: the U-Net,
the VAE, the CLIP text encoder and its tokenizer, and the presets that tie them together (configs.py).
A new model family (SDXL, a transformer backbone, a video U-Net) is a new module here."""
