"""One training step of the shipped tiny U-Net on the CPU: minisd vs diffusers, same weights, same batch.

    python benchmarks/train_cpu.py                 # fp32 and bf16 autocast, batch 64 (the recipe's)

A step is what `minisd train` does per U-Net step: forward, Min-SNR-weighted ε loss, backward, clip,
AdamW. Under bfloat16 autocast minisd computes attention in fp32 on the CPU (minisd/attention.py):
PyTorch's CPU flash-attention kernel is several times slower in bf16 than in fp32 at these head
sizes (16 and 32), which the first table measures directly. Prints markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, paired_medians  # noqa: E402

from minisd import StableDiffusion, UNet  # noqa: E402
from minisd.shapes.train import diffusion_loss  # noqa: E402


def attention_kernels(repeats: int) -> list[str]:
    """Forward + backward of one attention call at the tiny U-Net's shapes, bf16 vs fp32 inputs."""
    rows = ["| attention (batch 64, 4 heads) | bf16 (ms) | fp32 (ms) | bf16 / fp32 |", "|---|---|---|---|"]
    for name, L, S, hd in (("self, 16×16 latents", 256, 256, 16), ("cross, 16×16 × 77 tokens", 256, 77, 16),
                           ("self, 8×8 latents", 64, 64, 32)):
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randn(64, 4, n, hd, generator=g) for n in (L, S, S)]

        def run(dtype, inputs=inputs):
            q, k, v = (x.to(dtype).requires_grad_() for x in inputs)
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        bf, fp = paired_medians(lambda: run(torch.bfloat16), lambda: run(torch.float32), "cpu", repeats)
        rows.append(f"| {name} | {1e3 * bf:.1f} | {1e3 * fp:.1f} | {bf / fp:.2f} |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import diffusers

    pipe = StableDiffusion.from_pretrained("tiny")
    cfg = pipe.unet.config
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers()).train()
    ours = UNet(cfg).train()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    B = args.batch
    z0 = torch.randn(B, 4, cfg.sample_size, cfg.sample_size, generator=g)
    eps = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    with torch.no_grad():
        context = pipe.text_encoder(pipe.tokenizer(["a red circle on the left and a blue square on the right"] * B))
    alpha_bar = pipe.scheduler.alphas_cumprod()

    def step(model, opt, bf16):
        call = model if isinstance(model, UNet) else (lambda z, tt, c, control=None: model(z, tt, c).sample)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(call, z0, t, eps, context, alpha_bar, 5.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    print(f"{environment('cpu')}\n")
    print("\n".join(attention_kernels(args.repeats)) + "\n")
    print(f"| U-Net training step, batch {B} | minisd (s) | diffusers (s) | ratio |\n|---|---|---|---|")
    for bf16 in (False, True):
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ours, ref)]
        a, b = paired_medians(lambda o=opts[0], b=bf16: step(ours, o, b), lambda o=opts[1], b=bf16: step(ref, o, b),
                              "cpu", args.repeats)
        print(f"| {'bf16 autocast' if bf16 else 'fp32'} | {a:.3f} | {b:.3f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
