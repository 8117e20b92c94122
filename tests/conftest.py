"""Shared fixtures: a small model in the exact SD 1.5 block layout, its tokenizer, and the same random
weights in diffusers / transformers for parity tests."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from minisd import ModelConfig, SchedulerConfig, StableDiffusion, TextEncoderConfig, UNetConfig, VAEConfig
from minisd.models.tokenizer import build_word_tokenizer

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(max(torch.get_num_threads(), 1))

# The SD 1.5 topology (4 levels, 2 resnets per level, cross-attention on the first three, 1×1-conv
# proj_in/out, GEGLU, a VAE of 4 levels with mid attention, a causal CLIP) at toy widths: key names
# are exactly the real model's, only the shapes are small.
TEST = ModelConfig(
    unet=UNetConfig(block_out_channels=(32, 64, 64, 64), num_heads=(2, 2, 2, 2), cross_attention_dim=32,
                    norm_num_groups=8, sample_size=8),
    vae=VAEConfig(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64),
    text_encoder=TextEncoderConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, projection_dim=32),
    scheduler=SchedulerConfig(),
)

WORDS = ("a an the small large red green blue yellow purple orange circle square triangle star on at in and "
         "left right top bottom center of background white black gray cat photo").split()


def report(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Print max and mean |difference| (pytest -s or the -ra summary shows them) and check
    max |ours − ref| <= rtol · max |ref|."""
    diff = (ours.double() - ref.double()).abs()
    scale = ref.double().abs().max().item()
    rel = diff.max().item() / max(scale, 1e-12)
    print(f"[parity] {name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}, "
          f"relative max {rel:.3e} (tolerance {rtol:.0e})")
    assert torch.isfinite(ours).all(), f"{name}: non-finite output"
    assert rel <= rtol, f"{name}: relative max difference {rel:.3e} > {rtol:.0e}"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_word_tokenizer(list(WORDS), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_pipe(tokenizer) -> StableDiffusion:
    return StableDiffusion.from_config(TEST, tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipe")
    tiny_pipe.save_pretrained(folder)
    return folder
