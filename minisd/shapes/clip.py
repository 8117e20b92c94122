"""A tiny CLIP: the text encoder Stable Diffusion reads, trained the way OpenAI trained it.

Two towers map a caption and a picture to unit vectors; training pulls matching pairs together and
pushes the other pairs in the batch apart (Radford et al. 2021, fig. 3):

    logits = exp(τ) · T Iᵀ    (B × B: T text vectors, I image vectors, both L2-normalised)
    loss   = ½ [CE(logits, diag) + CE(logitsᵀ, diag)]

The text tower is minisd's `TextEncoder` (the same class as SD 1.5's CLIP ViT-L/14 text encoder), read
at the EOS token; after training, SD keeps only the text tower, frozen, and conditions on its whole
last hidden state. The image tower here is a small CNN (ViTs need more data than the shapes world).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.text_encoder import TextEncoder, TextEncoderConfig


class ImageTower(nn.Module):
    """64×64 picture -> vector. Four stride-2 convs (64 → 4 px), then a linear layer over the whole
    4×4 map (no global pooling: where things are matters as much as what they are)."""

    def __init__(self, width: int = 32, out_dim: int = 128):
        super().__init__()
        chs = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for cin, cout in zip(chs[:-1], chs[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(chs[-1] * 4 * 4, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.convs(x).flatten(1))  # (B, C·4·4) -> (B, out_dim)


class CLIP(nn.Module):
    def __init__(self, text_cfg: TextEncoderConfig, image_width: int = 32):
        super().__init__()
        self.text_encoder = TextEncoder(text_cfg)
        self.text_projection = nn.Linear(text_cfg.hidden_size, text_cfg.projection_dim, bias=False)
        self.image_tower = ImageTower(image_width, text_cfg.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # τ, learned; CLIP's initial value

    def encode_text(self, ids: Tensor) -> Tensor:
        hidden = self.text_encoder(ids)
        return F.normalize(self.text_projection(self.text_encoder.pooled(ids, hidden)), dim=-1)

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.image_tower(x), dim=-1)

    def forward(self, ids: Tensor, x: Tensor, negative_ids: Tensor | None = None) -> Tensor:
        """The symmetric contrastive loss of a batch of matching (caption, picture) pairs.

        `negative_ids`: extra captions that match no picture — "hard negatives" such as a two-object
        caption with its colours swapped. They join the texts each picture must choose among, so the
        text tower cannot get away with a bag of words: it has to say *which* object is red."""
        B = len(ids)
        texts = ids if negative_ids is None else torch.cat([ids, negative_ids])
        logits = self.logit_scale.exp().clamp(max=100) * self.encode_text(texts) @ self.encode_image(x).T
        target = torch.arange(B, device=ids.device)
        return (F.cross_entropy(logits[:B], target) + F.cross_entropy(logits.T, target)) / 2
