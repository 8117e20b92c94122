"""Our U-Net, VAE and text encoder equal diffusers' / transformers' with identical weights (fp32, CPU).

On the toy SD-1.5-layout config and on the exact SD 1.5 configs (full-size modules, small inputs).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST, report

from minisd import SD15, AutoencoderKL, TextEncoder, UNet
from minisd.formats.weights import fix_text_encoder_keys

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def reference_unet(cfg):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**cfg.to_diffusers()).eval()


def reference_vae(cfg):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**cfg.to_diffusers()).eval()


def reference_text_encoder(cfg):
    torch.manual_seed(0)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "eos_token_id",
            "bos_token_id", "pad_token_id")
    config = transformers.CLIPTextConfig(**{k: v for k, v in cfg.to_transformers().items() if k in keys})
    return transformers.CLIPTextModel(config).eval()


def ours(cls, cfg, state_dict):
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)  # strict: every name matches, no key map
    return model.eval()


def check_unet(cfg, size, name, batch=2):
    ref = reference_unet(cfg)
    model = ours(UNet, cfg, ref.state_dict())
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    context = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([999, 1])[:batch]
    with torch.no_grad():
        report(name, model(z, t, context), ref(z, t, context).sample, rtol=1e-4)


def check_vae(cfg, size, name):
    ref = reference_vae(cfg)
    model = ours(AutoencoderKL, cfg, ref.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    z = torch.randn(1, cfg.latent_channels, size // cfg.downsampling, size // cfg.downsampling, generator=g)
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        ours_posterior = model.encode(x)
        report(f"{name} encode mean", ours_posterior.mean, posterior.mean, rtol=1e-4)
        report(f"{name} encode std", ours_posterior.std, posterior.std, rtol=1e-4)
        report(f"{name} decode", model.decode(z), ref.decode(z).sample, rtol=1e-4)


def check_text_encoder(cfg, name):
    ref = reference_text_encoder(cfg)
    model = ours(TextEncoder, cfg, fix_text_encoder_keys(ref.state_dict()))
    ids = torch.randint(0, cfg.vocab_size - 2, (2, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, 9:] = cfg.vocab_size - 2, cfg.vocab_size - 1  # BOS, tokens, EOS padding
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        final_norm = getattr(ref, "final_layer_norm", None) or ref.text_model.final_layer_norm
        report(f"{name}", model(ids), out.last_hidden_state, rtol=1e-4)
        # clip_skip=1 as diffusers' pipeline computes it: hidden_states[-2], then the final LayerNorm
        report(f"{name} clip_skip=1", model(ids, clip_skip=1), final_norm(out.hidden_states[-2]), rtol=1e-4)
        report(f"{name} pooled", model.pooled(ids, model(ids)), out.pooler_output, rtol=1e-4)


def test_unet_tiny():
    check_unet(TEST.unet, 8, "unet (tiny SD1.5 layout)")


def test_unet_odd_latent_size():
    """Latents whose size does not divide by 8 (e.g. 500 px): the up path must follow the skips' sizes."""
    check_unet(TEST.unet, 9, "unet (9x9 latents)", batch=1)


def test_unet_inpainting_and_linear_projection():
    from dataclasses import replace

    check_unet(replace(TEST.unet, in_channels=9, use_linear_projection=True, num_heads=(1, 2, 4, 4)), 8,
               "unet (9 channels, linear proj, per-level heads)")


def test_vae_tiny():
    check_vae(TEST.vae, 32, "vae (tiny)")


def test_text_encoder_tiny():
    check_text_encoder(TEST.text_encoder, "text encoder (tiny)")


def test_unet_sd15():
    """The exact SD 1.5 U-Net (860M parameters) on 8×8 latents."""
    check_unet(SD15.unet, 8, "unet (SD 1.5 size)", batch=2)


def test_vae_sd15():
    check_vae(SD15.vae, 32, "vae (SD 1.5 size)")


def test_text_encoder_sd15():
    check_text_encoder(SD15.text_encoder, "text encoder (SD 1.5 size, CLIP ViT-L/14)")
