"""SD 1.5 at real size on one GPU: minisd against diffusers, eager and compiled, in the same process.

    python benchmarks/gpu.py                                   # the SD 1.5 table (about 8 minutes on an H100)
    python benchmarks/gpu.py --model small --device cpu --size 64 --steps 4 --batch 1 --modes eager
                                                               # the same script on CPU, as the tests run it

`--model sdxl` runs SDXL's base at its real shapes (default 1024 px: pass --size 1024; two text encoders,
size conditioning), minisd's `StableDiffusionXL` against diffusers' `StableDiffusionXLPipeline` on the same
weights (written by minisd's save_pretrained and read by diffusers); `--model small-xl` is its CPU test.
`--model sd3` runs SD 3 Medium's real architecture (a 2B MMDiT, CLIP-L, bigG, T5-XXL, the 16-channel VAE; default
1024 px, 28 steps, CFG 7.0, flow Euler), minisd's `StableDiffusion3` against diffusers' `StableDiffusion3Pipeline`
the same way, in the eager, compiled and best-vs-best modes; `--model small-sd3` is its CPU test.

Random weights at the exact SD 1.5 shapes (speed and memory do not depend on the values), copied
into both pipelines; the same prompt and initial noise; DDIM; CFG 7.5. For each mode, batch size and
step count it prints seconds per image, denoising it/s (one "it" = one CFG step = one U-Net call on
2·batch), peak GPU memory, and the difference between the two pipelines' images. Modes:

    eager      fp16, SDPA attention: what `from_pretrained` gives
    compiled   torch.compile of the U-Net and VAE decoder, default Inductor mode, in both libraries
    best       minisd only: fused QKV projections + torch.compile(mode="reduce-overhead") (CUDA graphs);
               its image difference is against diffusers' eager image
    best-vs-best  minisd's best against diffusers' own best recipe (its docs' "speed up inference": fused
               QKV projections, channels-last U-Net and VAE, torch.compile(mode="max-autotune", fullgraph=True),
               which captures CUDA graphs), both compiled anew in this block
    paths      minisd only, eager, each fast path or memory option on its own (channels-last U-Net, fused
               QKV, both, attention slicing, model CPU offload, int8 weight-only / dynamic, fp8), plus where the
               peak memory of both libraries comes from (denoising alone, VAE decode alone); its image
               difference is against minisd's own eager image

Rows are written to --json as they come, and a mode that fails is reported and skipped, so a run
cut short (a GPU lease ends) still leaves every finished row. --deadline stops starting new blocks
after that many seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, paired_medians, peak_memory, sync  # noqa: E402
from pipeline import SMALL, build  # noqa: E402

from minisd import SD15, fast  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
# per model: (latent channels, minisd's sampler (diffusers': the pipeline's scheduler), CFG scale)
RECIPES = {"sd15": (4, "ddim", 7.5), "small": (4, "ddim", 7.5), "sdxl": (4, "ddim", 7.5), "small-xl": (4, "ddim", 7.5),
           "sd3": (16, "flow_euler", 7.0), "small-sd3": (16, "flow_euler", 7.0)}


def compile_reference(ref) -> None:
    """diffusers' recommended recipe (docs: optimization/torch2.0): channels-last U-Net, torch.compile (SD 3:
    of its transformer)."""
    if hasattr(ref, "transformer"):
        ref.transformer = torch.compile(ref.transformer, dynamic=False)
    else:
        ref.unet.to(memory_format=torch.channels_last)
        ref.unet = torch.compile(ref.unet, dynamic=False)
    ref.vae.decoder = torch.compile(ref.vae.decoder, dynamic=False)


def best_reference(ref, device) -> None:
    """diffusers' own best recipe: fused QKV, channels-last, max-autotune compile with full graphs (on a
    GPU; Inductor's default mode on the CPU, where max-autotune only lengthens the compile). SD 3's pipeline has
    no fuse_qkv_projections: its transformer's and VAE's are called (the recipe of diffusers' SD 3 docs and
    its diffusion-fast repository), and the transformer, not a U-Net, is compiled."""
    mode = "max-autotune" if device.type == "cuda" else None
    if hasattr(ref, "transformer"):
        ref.transformer = getattr(ref.transformer, "_orig_mod", ref.transformer)  # not the compiled mode's wrapper
        ref.transformer.fuse_qkv_projections()
        ref.vae.fuse_qkv_projections()
        ref.vae.to(memory_format=torch.channels_last)
        ref.transformer = torch.compile(ref.transformer, mode=mode, fullgraph=True)
        ref.vae.decode = torch.compile(ref.vae.decode, mode=mode, fullgraph=True)
        return
    ref.unet = getattr(ref.unet, "_orig_mod", ref.unet)
    ref.fuse_qkv_projections()
    ref.unet.to(memory_format=torch.channels_last)
    ref.vae.to(memory_format=torch.channels_last)
    ref.unet = torch.compile(ref.unet, mode=mode, fullgraph=True)
    ref.vae.decode = torch.compile(ref.vae.decode, mode=mode, fullgraph=True)


def build_xl(cfg, device, dtype, folder: Path):
    """minisd's StableDiffusionXL with random weights and diffusers' pipeline on the same weights (read from
    minisd's save_pretrained folder), both sampling with DDIM."""
    import diffusers

    from minisd import StableDiffusionXL
    from minisd.models.tokenizer import Tokenizer

    tok, tok_2 = Tokenizer.clip_vit_l(), Tokenizer.clip_vit_l()
    tok_2.hf.pad_token = "!"        # bigG's tokenizer pads with "!", as in SDXL's repos
    tok_2.pad_id = tok_2.hf.pad_token_id
    ours = StableDiffusionXL.from_config(cfg, tok, tok_2, seed=0).to(device, dtype)
    ours.progress = False
    ours.save_pretrained(folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype, add_watermarker=False)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.to(device)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def t5_tokenizer(folder: Path):
    """A small T5-style tokenizer.json (unigram pieces, <pad>=0, </s>=1, <unk>=2, "$A </s>"): T5's tokens are
    always padded to 256, so any vocabulary that fits the encoder's times the same as T5's 32k pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    from minisd.models.tokenizer_t5 import T5Tokenizer

    words = PROMPT.split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in words] + [(ch, -8.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return T5Tokenizer(folder)


def build_sd3(cfg, device, dtype, folder: Path):
    """minisd's StableDiffusion3 with random weights, built on `device` and cast to `dtype` there, and diffusers'
    StableDiffusion3Pipeline on the same weights (read from minisd's save_pretrained folder, then deleted)."""
    import shutil

    import diffusers

    from minisd import StableDiffusion3
    from minisd.models.tokenizer import Tokenizer

    tok, tok_2 = Tokenizer.clip_vit_l(), Tokenizer.clip_vit_l()
    tok_2.hf.pad_token = "!"        # bigG's tokenizer pads with "!", as in SD 3's repos
    tok_2.pad_id = tok_2.hf.pad_token_id
    tok_3 = t5_tokenizer(folder / "t5_tokenizer")
    with torch.device(device):      # T5-XXL's 4.7B parameters are initialised on the GPU, not in CPU memory
        ours = StableDiffusion3.from_config(cfg, tok, tok_2, tok_3, device=device, dtype=dtype, seed=0)
    ours.progress = False
    ours.save_pretrained(folder / "sd3")
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(folder / "sd3", torch_dtype=dtype)
    ref.to(device)
    ref.set_progress_bar_config(disable=True)
    shutil.rmtree(folder)           # SD 3 Medium's folder holds 15 GB in fp16
    return ours, ref


def small_sd3():
    """SD 3's layout (CLIP-L and bigG with projections, T5, a 16-channel VAE with a shift and no quant convs) at
    widths a CPU test runs in seconds."""
    from dataclasses import replace

    from minisd import SchedulerConfig, TextEncoderConfig, VAEConfig
    from minisd.formats.sd3 import SD3Config
    from minisd.models.mmdit import MMDiTConfig
    from minisd.models.sd3_configs import TINY_T5

    clip = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=32, with_projection=True)
    return SD3Config(
        transformer=MMDiTConfig(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=32,
                                joint_attention_dim=80, caption_projection_dim=64, pooled_projection_dim=56,
                                pos_embed_max_size=16),
        vae=VAEConfig(latent_channels=16, block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
                      scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=clip, text_encoder_2=replace(clip, hidden_size=40, hidden_act="gelu", projection_dim=24),
        text_encoder_3=replace(TINY_T5, d_model=80), scheduler=SchedulerConfig(prediction_type="flow", shift=3.0))


def small_xl():
    """SDXL's layout at widths a CPU test runs in seconds; the second text encoder wider than the first,
    as in SDXL."""
    from dataclasses import replace

    from minisd.models.configs import SDXL_BASE, TextEncoderConfig, UNetConfig, VAEConfig

    clip = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return replace(SDXL_BASE, unet=replace(SDXL_BASE.unet, block_out_channels=(32, 64, 64), num_heads=(2, 4, 4),
                                           transformer_depth=(1, 2, 2), cross_attention_dim=80, norm_num_groups=8,
                                           sample_size=8, addition_time_embed_dim=8,
                                           projection_class_embeddings_input_dim=24 + 6 * 8),
                   vae=replace(VAEConfig(block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64),
                               scaling_factor=0.13025),
                   text_encoder=clip,
                   text_encoder_2=replace(clip, hidden_size=48, intermediate_size=96, hidden_act="gelu",
                                          projection_dim=24, with_projection=True))


def measure(ours, ref, args, mode: str, device, dtype, ref_images: dict, batches, report) -> None:
    """Time both pipelines (or minisd alone when ref is None: its images are then compared with the
    reference's eager images, kept in ref_images)."""
    h, (channels, sampler, cfg) = args.size // 8, RECIPES[args.model]
    for batch in batches:
        noise = torch.randn(batch, channels, h, h, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        for steps in args.steps:
            if report.over():
                return
            kw = dict(num_inference_steps=steps, guidance_scale=cfg, height=args.size, width=args.size)
            prompts = [PROMPT] * batch

            def run_ours():
                return ours(prompts, latents=noise, sampler=sampler, output_type="pt", **kw)

            def run_ref():
                return ref(prompts, latents=noise, output_type="pt", **kw).images

            t0 = time.perf_counter()
            a = run_ours()  # the first call compiles
            sync(device)
            warm = time.perf_counter() - t0
            if ref is not None:
                b = run_ref()
                ref_images.setdefault((batch, steps), b)  # the eager images, for the "best" rows
                t_ours, t_ref = paired_medians(run_ours, run_ref, device, args.repeats, warmup=1)
                m_ref = peak_memory(run_ref, device)
            else:
                b = ref_images.get((batch, steps))
                t_ours, _ = paired_medians(run_ours, lambda: None, device, args.repeats, warmup=0)
                m_ref = float("nan")
            diff = (a.float() - b.float()).abs() if b is not None else None
            m_ours = peak_memory(run_ours, device)
            report.add(dict(mode=mode, batch=batch, steps=steps, first_call_s=warm,
                             minisd_s_per_image=t_ours / batch, diffusers_s_per_image=t_ref / batch if ref else None,
                             minisd_it_s=steps / t_ours, diffusers_it_s=steps / t_ref if ref else None,
                             minisd_peak_gib=m_ours, diffusers_peak_gib=m_ref,
                             diff_max=diff.max().item() if diff is not None else None,
                             diff_mean=diff.mean().item() if diff is not None else None,
                             finite=bool(a.isfinite().all())))


def fast_paths(ours, ref, args, device, dtype, report) -> None:
    """minisd eager with one fast path or memory option at a time, 25 (or the fewest) steps; then the
    peak memory of the denoising loop and of the VAE decode alone, in both libraries."""
    steps, h = min(args.steps), args.size // 8
    kw = dict(num_inference_steps=steps, guidance_scale=7.5, height=args.size, width=args.size)
    unet = ours.unet

    def channels_last(on: bool):
        ours.unet.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def int8(mode: str | None):  # on a copy: quantizing is in place and one-way
        ours.unet = unet
        if mode is not None:
            ours.unet = copy.deepcopy(unet)
            fast.quantize_int8(ours.unet, mode)

    def fp8(on: bool):
        ours.unet = unet
        if on:
            ours.unet = copy.deepcopy(unet)
            fast.quantize_fp8(ours.unet)

    switches = {  # name: (on, off)
        "channels-last U-Net": (lambda: channels_last(True), lambda: channels_last(False)),
        "fused QKV": (ours.fuse_qkv_projections, ours.unfuse_qkv_projections),
        "channels-last + fused QKV": (lambda: (channels_last(True), ours.fuse_qkv_projections()),
                                      lambda: (channels_last(False), ours.unfuse_qkv_projections())),
        "attention slicing (1024)": (ours.enable_attention_slicing, ours.disable_attention_slicing),
        "model CPU offload": (lambda: ours.enable_model_cpu_offload(device),
                              lambda: (ours.disable_model_cpu_offload(), ours.to(device))),
        "int8 weight-only": (lambda: int8("weight-only"), lambda: int8(None)),
        "int8 dynamic": (lambda: int8("dynamic"), lambda: int8(None)),
        "fp8 (e4m3 weights and activations, scaled matmuls)": (lambda: fp8(True), lambda: fp8(False)),
    }
    for batch in args.paths_batch or args.batch:
        noise = torch.randn(batch, 4, h, h, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        prompts = [PROMPT] * batch

        def run_ours():
            return ours(prompts, latents=noise, sampler="ddim", output_type="pt", **kw)

        base = run_ours()
        t_base, _ = paired_medians(run_ours, lambda: None, device, args.repeats, warmup=0)
        m_base = peak_memory(run_ours, device)
        report.add(dict(mode="paths", path="eager (reference row)", batch=batch, steps=steps,
                        minisd_s_per_image=t_base / batch, minisd_peak_gib=m_base, diff_max=0.0, diff_mean=0.0,
                        finite=bool(base.isfinite().all())))
        for name, (on, off) in switches.items():
            if report.over():
                return
            try:
                on()
                a = run_ours()
                t, _ = paired_medians(run_ours, lambda: None, device, args.repeats, warmup=0)
                m = peak_memory(run_ours, device)
                diff = (a.float() - base.float()).abs()
                report.add(dict(mode="paths", path=name, batch=batch, steps=steps, minisd_s_per_image=t / batch,
                                speedup_vs_eager=t_base / t, minisd_peak_gib=m, diff_max=diff.max().item(),
                                diff_mean=diff.mean().item(), finite=bool(a.isfinite().all())))
            except Exception:  # noqa: BLE001 - report and go on with the next path
                report.error(f"paths: {name}, batch {batch}")
            finally:
                off()
        # where the peak comes from: the denoising loop alone, then the VAE decode alone
        lat_ours = ours(prompts, latents=noise, sampler="ddim", output_type="latent", **kw)
        lat_ref = ref(prompts, latents=noise, output_type="latent", **kw).images
        z = lat_ours / ours.vae.config.scaling_factor
        report.add(dict(mode="paths", path="peak: denoising only (output_type latent)", batch=batch, steps=steps,
                        minisd_peak_gib=peak_memory(
                            lambda: ours(prompts, latents=noise, sampler="ddim", output_type="latent", **kw), device),
                        diffusers_peak_gib=peak_memory(
                            lambda: ref(prompts, latents=noise, output_type="latent", **kw), device),
                        diff_max=(lat_ours.float() - lat_ref.float()).abs().max().item()))
        with torch.no_grad():
            report.add(dict(mode="paths", path="peak: VAE decode only", batch=batch, steps=steps,
                            minisd_peak_gib=peak_memory(lambda: ours.vae.decode(z), device),
                            diffusers_peak_gib=peak_memory(lambda: ref.vae.decode(z), device)))


class Report:
    """Rows printed and written to the JSON file as they come; errors recorded, not raised."""

    def __init__(self, path, environment: str, args, deadline: float | None):
        self.path, self.start, self.deadline = path, time.perf_counter(), deadline
        self.data = {"environment": environment, "args": vars(args), "rows": [], "errors": [], "skipped": []}

    def add(self, row: dict) -> None:
        row["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.data["rows"].append(row)
        print(row_text(row) if row["mode"] != "paths" else path_text(row), flush=True)
        self.save()

    def error(self, where: str) -> None:
        print(f"FAILED {where}:\n{traceback.format_exc()}", flush=True)
        self.data["errors"].append({"where": where, "traceback": traceback.format_exc()})
        self.save()

    def over(self) -> bool:
        late = self.deadline is not None and time.perf_counter() - self.start > self.deadline
        if late:
            self.data["skipped"].append(round(time.perf_counter() - self.start, 1))
        return late

    def save(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1))


def path_text(r: dict) -> str:
    f = lambda k, fmt: "–" if r.get(k) is None or r[k] != r[k] else format(r[k], fmt)  # noqa: E731
    return (f"| paths | {r['path']} | {r['batch']} | {r['steps']} | {f('minisd_s_per_image', '.3f')} | "
            f"{f('speedup_vs_eager', '.2f')}× | {f('minisd_peak_gib', '.2f')} | {f('diffusers_peak_gib', '.2f')} | "
            f"{f('diff_max', '.1e')} / {f('diff_mean', '.1e')} | {r.get('finite', '–')} |")


def row_text(r: dict) -> str:
    f = lambda v, fmt: "–" if v is None or v != v else format(v, fmt)  # noqa: E731
    ratio = r["diffusers_s_per_image"] / r["minisd_s_per_image"] if r["diffusers_s_per_image"] else None
    return (f"| {r['mode']} | {r['batch']} | {r['steps']} | {f(r['minisd_s_per_image'], '.3f')} | "
            f"{f(r['diffusers_s_per_image'], '.3f')} | {f(ratio, '.2f')}× | {f(r['minisd_it_s'], '.1f')} | "
            f"{f(r['diffusers_it_s'], '.1f')} | {f(r['minisd_peak_gib'], '.2f')} | {f(r['diffusers_peak_gib'], '.2f')} | "
            f"{f(r['diff_max'], '.1e')} / {f(r['diff_mean'], '.1e')} | {r['first_call_s']:.0f} |")


def build_models(model: str, device, dtype):
    """(minisd's pipeline, diffusers' pipeline) on the same random weights, for `--model`."""
    import tempfile

    from minisd.formats.sd3 import SD3_MEDIUM_PIPELINE
    from minisd.models.configs import SDXL_BASE

    if model in ("sdxl", "small-xl"):
        folder = Path(tempfile.mkdtemp(prefix="minisd-bench-xl-"))
        return build_xl(SDXL_BASE if model == "sdxl" else small_xl(), device, dtype, folder)
    if model in ("sd3", "small-sd3"):
        folder = Path(tempfile.mkdtemp(prefix="minisd-bench-sd3-"))
        return build_sd3(SD3_MEDIUM_PIPELINE if model == "sd3" else small_sd3(), device, dtype, folder)
    return build(SD15 if model == "sd15" else SMALL, device, dtype)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15", choices=list(RECIPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512; sd3: 1024)")
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="(default 50 25; sd3: 28)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="(default 1 4; sd3: 1)")
    ap.add_argument("--modes", nargs="+", default=None, choices=["eager", "paths", "compiled", "best", "best-vs-best"],
                    help="(default eager paths compiled best; sd3: eager compiled best-vs-best)")
    ap.add_argument("--compiled-batch", type=int, nargs="+", default=None,
                    help="batch sizes for the compiled and best modes (default: --batch; each size compiles anew)")
    ap.add_argument("--paths-batch", type=int, nargs="+", default=None, help="batch sizes for the paths mode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=None, help="start no new block after this many seconds")
    ap.add_argument("--json", default=None, help="also write the rows here (after every row)")
    args = ap.parse_args(argv)
    sd3 = args.model in ("sd3", "small-sd3")
    defaults = (dict(size=1024, steps=[28], batch=[1], modes=["eager", "compiled", "best-vs-best"]) if sd3 else
                dict(size=512, steps=[50, 25], batch=[1, 4], modes=["eager", "paths", "compiled", "best"]))
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if sd3 and "paths" in args.modes:
        raise ValueError(f"--modes paths times the U-Net models' fast paths (sd15, sdxl), not --model {args.model}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as diffusers' benchmarks run
    ours, ref = build_models(args.model, device, dtype)
    _, sampler, cfg = RECIPES[args.model]
    print(f"\n{environment(device)}, {args.dtype}, {args.model} random weights, {args.size} px, {sampler}, CFG {cfg}, "
          f"median of {args.repeats}\n")
    print("| mode | batch | steps | minisd s/image | diffusers s/image | speed-up | minisd it/s | diffusers it/s | "
          "minisd peak GiB | diffusers peak GiB | image diff max / mean | first call s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    report = Report(args.json, environment(device), args, args.deadline)
    ref_images: dict = {}
    for mode in args.modes:
        if report.over():
            break
        try:
            if mode == "paths":
                print("\n| mode | fast path | batch | steps | minisd s/image | vs eager | minisd peak GiB | "
                      "diffusers peak GiB | image diff max / mean | finite |\n|---|---|---|---|---|---|---|---|---|---|")
                fast_paths(ours, ref, args, device, dtype, report)
                continue
            if mode == "compiled":
                ours.compile()
                compile_reference(ref)
            elif mode in ("best", "best-vs-best"):  # compiled anew, on top of the fused projections
                if not sd3 and not any(m.fused for m in fast._attentions(ours.unet)):  # minisd's MMDiT: unfused
                    ours.fuse_qkv_projections()
                ours.compile(mode="reduce-overhead" if device.type == "cuda" else None)
            if mode == "best-vs-best":
                best_reference(ref, device)
            batches = args.batch if mode == "eager" else (args.compiled_batch or args.batch)
            measure(ours, ref if mode != "best" else None, args, mode, device, dtype, ref_images, batches, report)
        except Exception:  # noqa: BLE001 - report and go on with the next mode
            report.error(mode)
    return report.data["rows"]


if __name__ == "__main__":
    main()
