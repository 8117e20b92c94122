"""Textual inversion (Gal et al. 2022): a new word for a frozen model, learnt as one or a few vectors
in the text encoder's input space.

    "a photo of <cat-toy>" ─ tokenizer ─ [..., 49408, ...] ─ token_embedding: row 49408 is the learnt v*

Loading one adds its token to the tokenizer and its vector as a new row of the text encoder's token
embedding; no network weight changes. The files, as diffusers' `load_textual_inversion` reads them:

* diffusers, `learned_embeds.safetensors` or `.bin` (a folder holding one, or the file):
  {token: (E,) or (n, E)};
* AUTOMATIC1111 `.pt`: {"string_to_param": {"*": (n, E)}, "name": token, "step": …, …};
* AUTOMATIC1111 `.safetensors`: {"emb_params": (n, E)}; the file holds no name, so the token is
  `token=` or the file's stem, as A1111 names it (diffusers would name it "emb_params").

* SDXL (AUTOMATIC1111's and kohya's `.safetensors`): {"clip_l": (n, 768), "clip_g": (n, 1280)}, one set of
  vectors per text encoder, the token `token=` or the file's stem (`read_sdxl_embedding`).

A multi-vector embedding (n > 1) becomes n tokens `<tok>`, `<tok>_1`, …, `<tok>_{n-1}`, and the
tokenizer expands `<tok>` in a prompt to all of them (`Tokenizer.expand_multi_vector`). As in
diffusers, the embedding matrix becomes its first len(tokenizer) rows plus the new vectors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..formats.weights import read_state_dict
from ..models.text_encoder import TextEncoder
from ..models.tokenizer import Tokenizer

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")  # a folder's file, in this order


@dataclass(frozen=True)
class Embedding:
    """One concept: its token and its vectors (n, E), one per token it becomes."""
    token: str
    vectors: Tensor

    @property
    def tokens(self) -> list[str]:
        """`<tok>`, then `<tok>_1` … for the other vectors (diffusers' names)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]


def read_embedding(source: str | os.PathLike | dict | Tensor, token: str | None = None) -> Embedding:
    """An embedding from a file, a folder holding learned_embeds.safetensors/.bin, a state dict, or a
    tensor (E,) / (n, E) (then `token` is needed). `token` replaces the name the file gives."""
    if isinstance(source, Tensor):
        if token is None:
            raise ValueError("a bare tensor holds no token name: pass token=…")
        return _checked(token, source, "the tensor")
    if isinstance(source, dict):
        return _from_state_dict(source, token, "the state dict", stem=None)
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither {' nor '.join(DIFFUSERS_FILES)}")
        path = found[0]
    return _from_state_dict(read_state_dict(path, keep_all=True), token, str(path), stem=path.stem)


SDXL_KEYS = ("clip_l", "clip_g")   # the vectors for CLIP ViT-L (text_encoder) and OpenCLIP bigG (text_encoder_2)


def read_sdxl_embedding(source: str | os.PathLike | dict, token: str | None = None) -> tuple[Embedding, Embedding]:
    """An SDXL embedding's (clip_l, clip_g) pair, from a file or a state dict {"clip_l": …, "clip_g": …};
    the token is `token`, else the file's stem."""
    if isinstance(source, dict):
        sd, where, stem = source, "the state dict", None
    else:
        path = Path(source)
        sd, where, stem = read_state_dict(path, keep_all=True), str(path), path.stem
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if sorted(tensors) != sorted(SDXL_KEYS):
        raise ValueError(f"{where} is not an SDXL embedding: it holds {', '.join(sorted(tensors)[:8]) or 'no tensors'}, "
                         f"not clip_l and clip_g")
    clip_l, clip_g = (_named(token, stem, tensors[k], where) for k in SDXL_KEYS)
    if len(clip_l.vectors) != len(clip_g.vectors):
        raise ValueError(f"{where}: clip_l has {len(clip_l.vectors)} vectors but clip_g {len(clip_g.vectors)}")
    return clip_l, clip_g


def _from_state_dict(sd: dict, token: str | None, where: str, stem: str | None) -> Embedding:
    """Pick the layout by its keys (A1111 .pt, A1111 .safetensors, diffusers), then the token's name."""
    if "string_to_param" in sd:  # A1111 .pt: the vectors under the placeholder "*"
        params = sd["string_to_param"]
        if not isinstance(params, dict) or not isinstance(params.get("*"), Tensor):
            raise ValueError(f"{where}: string_to_param must hold the embedding under '*', "
                             f"got {sorted(params) if isinstance(params, dict) else type(params).__name__}")
        name = sd.get("name") if isinstance(sd.get("name"), str) and sd.get("name") else stem
        return _named(token, name, params["*"], where)
    tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{where} holds no embedding (no tensors)")
    if list(tensors) == ["emb_params"]:  # A1111 .safetensors: no name inside
        return _named(token, stem, tensors["emb_params"], where)
    if len(tensors) == 1:  # diffusers: {token: vectors}
        (name, vectors), = tensors.items()
        return _named(token, name, vectors, where)
    if token is None or token not in tensors:
        raise ValueError(f"{where} holds {len(tensors)} embeddings ({', '.join(sorted(tensors)[:8])}); "
                         f"pass token= naming the one to load{'' if token is None else f', not {token!r}'}")
    return _checked(token, tensors[token], where)


def _named(token: str | None, name: str | None, vectors: Tensor, where: str) -> Embedding:
    if token is None and name is None:
        raise ValueError(f"{where} holds an embedding with no name: pass token=…")
    return _checked(token if token is not None else name, vectors, where)


def _checked(token: str, vectors: Tensor, where: str) -> Embedding:
    """Shape (E,) or (n, E), floating point, finite, at least one vector."""
    if not isinstance(token, str) or token.split() != [token]:
        raise ValueError(f"token {token!r} must be a non-empty string without spaces")
    if not isinstance(vectors, Tensor) or not vectors.is_floating_point() or vectors.dim() not in (1, 2):
        what = f"{vectors.dtype} {tuple(vectors.shape)}" if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(f"{where}: embedding {token!r} is {what}; expected floating-point (E,) or (n, E)")
    vectors = vectors.detach().reshape(-1, vectors.shape[-1])  # (n, E)
    if vectors.numel() == 0:
        raise ValueError(f"{where}: embedding {token!r} is empty, shape {tuple(vectors.shape)}")
    bad = (~torch.isfinite(vectors)).sum().item()
    if bad:
        raise ValueError(f"{where}: embedding {token!r} has {bad} NaN/inf values of {vectors.numel()}")
    return Embedding(token, vectors)


def check_embedding(tokenizer: Tokenizer, text_encoder: TextEncoder, embedding: Embedding) -> None:
    """Its width is the text encoder's and its tokens are new to the tokenizer, or a ValueError."""
    width = text_encoder.get_input_embeddings().embedding_dim
    if embedding.vectors.shape[-1] != width:
        raise ValueError(f"embedding {embedding.token!r} is {embedding.vectors.shape[-1]} wide, but this text "
                         f"encoder's token embeddings are {width} wide (SD 1.x: 768, SD 2.x: 1024, "
                         f"SDXL: 768 and 1280)")
    taken = [t for t in embedding.tokens if t in tokenizer]
    if taken:
        raise ValueError(f"token {taken[0]!r} is already in the tokenizer's vocabulary: pass token=… with "
                         f"another name, or unload the textual inversion that added it")


def add_embedding(tokenizer: Tokenizer, text_encoder: TextEncoder, embedding: Embedding,
                  ids: list[int] | None = None) -> list[int]:
    """Add the embedding's tokens to the tokenizer and its vectors as their rows of the token
    embedding; returns the new ids. Everything is checked before anything changes. `ids`: the tokens are
    in the tokenizer already, at these ids (a tokenizer two text encoders share): only the rows are set."""
    if ids is None:
        check_embedding(tokenizer, text_encoder, embedding)
    text_encoder.resize_token_embeddings(len(tokenizer) + (len(embedding.tokens) if ids is None else 0))
    ids = tokenizer.add_tokens(embedding.tokens) if ids is None else ids
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = embedding.vectors.to(device=weight.device, dtype=weight.dtype)
    return ids
