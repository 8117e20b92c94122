"""Shared by the benchmarks: identical random weights in minisd and in diffusers/transformers, and timing.

Speed and memory do not depend on the weights' values, so random weights at the exact SD 1.5 shapes
measure what the real model would (no weights can be downloaded here)."""

from __future__ import annotations

import statistics
import time

import torch

from minisd import AutoencoderKL, TextEncoder, UNet
from minisd.formats.weights import fix_text_encoder_keys


def reference_modules(cfg, device, dtype, seed: int = 0):
    """diffusers UNet2DConditionModel and AutoencoderKL, transformers CLIPTextModel, built from minisd's config."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**cfg.unet.to_diffusers())
        vae = diffusers.AutoencoderKL(**cfg.vae.to_diffusers())
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim", "eos_token_id")
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **{k: v for k, v in cfg.text_encoder.to_transformers().items() if k in keys}))
    return unet.to(dtype).eval(), vae.to(dtype).eval(), text.to(dtype).eval()


def minisd_modules(cfg, ref_unet, ref_vae, ref_text):
    """minisd's modules holding copies of the reference weights (built on the meta device, then filled)."""
    out = []
    for cls, sub_cfg, ref, fix in ((UNet, cfg.unet, ref_unet, None), (AutoencoderKL, cfg.vae, ref_vae, None),
                                   (TextEncoder, cfg.text_encoder, ref_text, fix_text_encoder_keys)):
        sd = {k: v.clone() for k, v in ref.state_dict().items()}
        sd = fix(sd) if fix else sd
        with torch.device("meta"):
            model = cls(sub_cfg)
        model.load_state_dict(sd, strict=True, assign=True)
        out.append(model.eval())
    return out


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def paired_medians(fn_a, fn_b, device, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median times of fn_a and fn_b, measured alternately (a, b, a, b, ...) so that drift in the
    machine's speed (other load, clocks) hits both alike."""
    for _ in range(warmup):
        fn_a(), fn_b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def peak_memory(fn, device) -> float:
    """Peak GPU memory (GiB) allocated while fn() runs; nan on CPU."""
    if torch.device(device).type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def environment(device) -> str:
    import platform

    parts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    if torch.device(device).type == "cuda":
        parts.insert(0, torch.cuda.get_device_name())
        try:
            import subprocess

            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip()
            parts.append(f"driver {drv}")
        except OSError:
            pass
    else:
        parts.insert(0, f"CPU ({torch.get_num_threads()} threads)")
    try:
        import diffusers
        import transformers

        parts += [f"diffusers {diffusers.__version__}", f"transformers {transformers.__version__}"]
    except ImportError:
        pass
    return ", ".join(parts)
