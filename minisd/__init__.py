"""minisd: Stable Diffusion 1.x from first principles — a course and the package it is built on.

    from minisd import StableDiffusion
    pipe = StableDiffusion.from_pretrained("tiny")          # the shipped shapes-world model
    image = pipe("a red circle on the left", seed=0)[0]     # a list of PIL images
"""

from .nn.attention import attention, capture_attention
from .canny import canny
from .models.configs import SD15, TINY, ModelConfig
from .adapters.controlnet import ControlNet, ControlNetConfig
from .adapters.lora import LoRA
from .pipeline import StableDiffusion, save_single_file
from .pipeline_xl import StableDiffusionXL
from .pipeline_sd3 import StableDiffusion3
from .diffusion.schedules import SchedulerConfig
from .models.text_encoder import TextEncoder, TextEncoderConfig
from .models.tokenizer import Tokenizer
from .models.unet import UNet, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .formats.weights import WeightsError

__version__ = "0.1.0"

__all__ = ["SD15", "TINY", "AutoencoderKL", "ControlNet", "ControlNetConfig", "LoRA", "ModelConfig", "SchedulerConfig", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL", "TextEncoder",
           "TextEncoderConfig", "Tokenizer", "UNet", "UNetConfig", "VAEConfig", "WeightsError", "attention",
           "canny", "capture_attention", "save_single_file"]
