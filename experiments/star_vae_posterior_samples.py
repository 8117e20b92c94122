"""Do ground-truth small stars decode as well from posterior *samples* as from the posterior's mean?

    python experiments/star_vae_posterior_samples.py

The star LoRA trains on z₀ sampled from the VAE's posterior (mean + σ·ξ); `minisd eval --vae`'s
ceiling decodes the mean. The 30 small-star prompts of `minisd eval --lora`, five renders each (150 pictures),
encoded, then decoded from the mean and from three posterior samples; printed: σ, the share the analyser reads
as stars (the asked colour's object, or the largest: lora_by_size.py's counting), and the diffusion noise
σ_t/α_t at the last two DDIM steps. Session 12, before trial lora30 (experiments/star_lora_trials.md).
"""

import torch

from lora_by_size import shapes_by_size, star_share
from minisd import StableDiffusion
from minisd.eval import concept_prompts, render_prompt
from minisd.shapes import to_tensor


def decoded_star_share(pipe, prompts, z) -> float:
    rec = pipe.vae.decode(z)
    images = ((rec / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return star_share(shapes_by_size(prompts, images))


if __name__ == "__main__":
    pipe = StableDiffusion.from_pretrained("tiny", dtype=torch.float32)
    prompts = [p for p in concept_prompts("star") if " small " in p] * 5
    x = torch.stack([to_tensor(render_prompt(p, seed=50_000 + i)) for i, p in enumerate(prompts)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        post = pipe.vae.encode(x)
        print(f"posterior σ: mean {post.std.mean():.3f}; latents' spread {post.mean.std():.3f}")
        print(f"decoded from the mean: {decoded_star_share(pipe, prompts, post.mode()):.3f}")
        for k in range(3):
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            print(f"decoded from sample {k}: {decoded_star_share(pipe, prompts, z):.3f}")
    a = pipe.scheduler.alphas_cumprod()
    print("diffusion noise σ_t/α_t:", {t: round(float(((1 - a[t]) / a[t]).sqrt()), 3) for t in (40, 80)})
