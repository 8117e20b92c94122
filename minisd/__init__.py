"""minisd: Stable Diffusion 1.x from first principles — a course and the package it is built on.

    from minisd import StableDiffusion
    pipe = StableDiffusion.from_pretrained("tiny")          # the shipped shapes-world model
    image = pipe("a red circle on the left", seed=0)[0]     # a list of PIL images
"""

from .attention import attention, capture_attention
from .canny import canny
from .configs import SD15, TINY, ModelConfig
from .controlnet import ControlNet, ControlNetConfig
from .lora import LoRA
from .pipeline import StableDiffusion, save_single_file
from .schedules import SchedulerConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig
from .weights import WeightsError

__version__ = "0.1.0"

__all__ = ["SD15", "TINY", "AutoencoderKL", "ControlNet", "ControlNetConfig", "LoRA", "ModelConfig", "SchedulerConfig", "StableDiffusion", "TextEncoder",
           "TextEncoderConfig", "Tokenizer", "UNet", "UNetConfig", "VAEConfig", "WeightsError", "attention",
           "canny", "capture_attention", "save_single_file"]
