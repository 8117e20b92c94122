"""Do ground-truth small stars decode as well from posterior *samples* as from the posterior's mean?

    python experiments/star_vae_posterior_samples.py

The star LoRA trains on z₀ sampled from the VAE's posterior (mean + σ·ξ, σ ≈ 0.22); `minisd eval --vae`'s
ceiling decodes the mean. The 30 small-star prompts of `minisd eval --lora`, five renders each (150 pictures),
encoded, then decoded from the mean and from three posterior samples; printed: the share the analyser reads
as stars (the asked colour's object). Session 12, before trial lora30 (experiments/star_lora_trials.md).
"""

import torch

from minisd import StableDiffusion
from minisd.eval import analyse, concept_prompts, parse, render_prompt
from minisd.shapes import to_tensor


def star_share(prompts, rec) -> float:
    images = ((rec / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    read = [analyse(im).find(parse(p)[0][0].colour) for p, im in zip(prompts, images)]
    return sum(bool(o and o.shape == "star") for o in read) / len(prompts)


if __name__ == "__main__":
    pipe = StableDiffusion.from_pretrained("tiny", dtype=torch.float32)
    prompts = [p for p in concept_prompts("star") if " small " in p] * 5
    x = torch.stack([to_tensor(render_prompt(p, seed=50_000 + i)) for i, p in enumerate(prompts)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        post = pipe.vae.encode(x)
        print(f"posterior σ: mean {post.std.mean():.3f}; latents' spread {post.mean.std():.3f}")
        print(f"decoded from the mean: {star_share(prompts, pipe.vae.decode(post.mode())):.3f}")
        for k in range(3):
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            print(f"decoded from sample {k}: {star_share(prompts, pipe.vae.decode(z)):.3f}")
