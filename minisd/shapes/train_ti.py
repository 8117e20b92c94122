"""Textual inversion (Gal et al. 2022): a new word `<star>` for the frozen tiny model, learnt as one or a few
vectors of the text encoder's input, everything else untouched.

    trainable  the token embedding's rows of <star> (and <star>_1, ... for several vectors), started from the
               embedding of a related word (AdapterConfig.init_word); every other row restored after each step
    data       pictures of the concept only, captions with the concept's word replaced by the token:
               "a small red <star> on the left"
    loss       the diffusion loss, weighted onto a star's notches and every outline as the LoRA's is
    saved      the vectors in the diffusers layout ({token: (n, E)} in learned_embeds.safetensors) and A1111's
               (.pt with string_to_param); `pipe.load_textual_inversion` reads either

The frozen U-Net only draws what it was trained to draw: the token can steer it to anything it already
makes (a colour, a size, a pointed triangle), not to a shape it never learnt. The head-to-head in
docs/adapters.md measures how far that goes.

config → data → model → loop → save, in `train_textual_inversion`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import torch

from ..formats.files import atomic_write
from ..formats.weights import write_safetensors
from .adapter_config import AdapterConfig, draw_captions, finish, latent_batch, start
from .loop import Steps, diffusion_loss, lr_at, optimiser_step, resume, use_bf16
from .train_lora import concept_data


def concept_token(concept: str) -> str:
    """The token a textual inversion of `concept` learns: `<star>`."""
    return f"<{concept}>"


def with_token(caption: str, concept: str) -> str:
    """The caption with every mention of the concept's word replaced by its token."""
    return re.sub(rf"\b{concept}\b", concept_token(concept), caption)


def start_vectors(pipe, init_word: str, n: int) -> torch.Tensor:
    """(n, E): the init word's embedding, n times (a word of the tokenizer's vocabulary, one token)."""
    row = pipe.text_encoder.get_input_embeddings().weight[word_id(pipe.tokenizer, init_word)]
    return row.detach().float().repeat(n, 1)


def word_id(tokenizer, word: str) -> int:
    """The one token id of `word`; a ValueError if it is not a single token of the vocabulary."""
    ids = [i for i in tokenizer(word, warn=False)[0].tolist() if i not in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)]
    unknown = tokenizer.hf.unk_token_id
    if len(ids) != 1 or (unknown is not None and ids[0] == unknown) or " " in word.strip():
        raise ValueError(f"--init-word must be one word of the tokenizer's vocabulary, got {word!r}")
    return ids[0]


def textual_inversion_loss(pipe, captions: list[str], z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                           alpha_bar: torch.Tensor, min_snr_gamma: float | None = 5.0,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """The diffusion loss with the gradient flowing back through the frozen U-Net and text encoder into the token
    embedding: the captions (holding the token) encoded with gradients on, the U-Net's weights untouched."""
    context = pipe.text_encoder(pipe.tokenizer(captions, warn=False).to(z0.device))
    return diffusion_loss(pipe.unet, z0, t, eps, context, alpha_bar, min_snr_gamma, weight=weight)


def save_embedding(vectors: torch.Tensor, token: str, out: Path, steps: int) -> None:
    """The vectors in both layouts: out/learned_embeds.safetensors (diffusers) and out/<name>.pt (A1111)."""
    vectors = vectors.detach().float().cpu().contiguous()
    write_safetensors({token: vectors}, out / "learned_embeds.safetensors", {"minisd_concept": token})
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": token, "step": steps,
             "sd_checkpoint": None, "sd_checkpoint_name": "minisd_tiny"}
    atomic_write(out / f"{out.name}.pt", lambda tmp: torch.save(a1111, tmp))


def train_textual_inversion(cfg: AdapterConfig, force: bool = False) -> Path:
    """The textual-inversion loop; returns the folder the embedding was saved to."""
    out, work, log, pipe, dist = start(cfg, force)
    device, t0 = pipe.device, time.time()
    token = concept_token(cfg.concept)
    init = start_vectors(pipe, cfg.init_word, cfg.num_vectors)
    pipe.load_textual_inversion(init, token=token)
    emb = pipe.text_encoder.get_input_embeddings()
    ids = torch.tensor(pipe.tokenizer.hf.convert_tokens_to_ids(pipe.textual_inversions[token].tokens))
    frozen_rows = emb.weight.detach().clone()  # every other row is put back after each step
    emb.weight.requires_grad_(True)
    log(f"textual inversion: {token} as {cfg.num_vectors} vector(s) of {emb.embedding_dim}, started from "
        f"{cfg.init_word!r}: {cfg.num_vectors * emb.embedding_dim} trainable numbers")

    scenes, means, stds, weights = concept_data(cfg, pipe, log, t0)  # pictures of the concept only
    opt = torch.optim.AdamW([emb.weight], lr=cfg.lr, weight_decay=0.0)
    step0, losses = resume(work / "textual-inversion.pt", log, embedding=emb, opt=opt)

    alpha_bar = pipe.scheduler.alphas_cumprod().to(device)
    rng, g = np.random.default_rng(cfg.seed + step0), torch.Generator().manual_seed(cfg.seed + step0)
    bf16 = use_bf16(cfg.bf16, device)
    keep = torch.ones(len(frozen_rows), dtype=torch.bool)
    keep[ids] = False
    state = lambda: dict(embedding=emb.state_dict(), opt=opt.state_dict())
    steps = Steps("textual-inversion", step0, cfg.steps, log, work / "textual-inversion.pt", cfg.checkpoint_minutes,
                  losses, dist.is_main)
    for step in steps:
        opt.param_groups[0]["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=g)
        z0 = dist.share(latent_batch(pipe, means, stds, idx, g))
        captions = dist.share([with_token(c, cfg.concept) for c in draw_captions(scenes, idx, rng, cfg.caption_dropout)])
        t = dist.share(torch.randint(0, len(alpha_bar), (cfg.batch,), generator=g)).to(device)
        eps = dist.share(torch.randn((cfg.batch, *z0.shape[1:]), generator=g)).to(device)
        weight = None if weights is None else weights[dist.share(idx)].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = textual_inversion_loss(pipe, captions, z0, t, eps, alpha_bar, cfg.min_snr_gamma, weight)
        optimiser_step(loss, opt, [emb.weight], clip=None, dist=dist)
        with torch.no_grad():
            emb.weight[keep] = frozen_rows[keep].to(emb.weight.dtype)  # only the new token's rows move
        steps.record(step, dist.all_mean(loss).item(), opt.param_groups[0]["lr"], state)
    steps.finish(state)

    vectors = emb.weight.detach()[ids]
    start_word = init[0].to(vectors.device)
    log(f"{token}: moved {float((vectors - start_word).norm(dim=-1).mean()):.3f} from {cfg.init_word!r} "
        f"(its norm {float(start_word.norm()):.3f})")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_embedding(vectors, token, out, cfg.steps)
    return finish(cfg, out, work, log, t0, dist, steps.seconds_per_step)
