"""`StableDiffusionXL`: SDXL's base and refiner (Podell et al. 2023) on SD 1.x's generation loop.

    prompt ─ tokenizer   ─ CLIP ViT-L      ─ penultimate layer (B, 77, 768)  ┐ concatenated: context (B, 77, 2048)
           └ tokenizer_2 ─ OpenCLIP bigG   ─ penultimate layer (B, 77, 1280) ┘
                                           └ projected EOS vector: pooled (B, 1280)
    size and crop ("micro-conditioning", §2.2): time_ids = original (h, w), crop (top, left), target (h, w)
                                                (the refiner: original (h, w), crop (top, left), aesthetic score)
    sampler loop: ε̂ = unet(z_t, t, context, pooled=…, time_ids=…), with CFG over all three ─ z_0 ─ vae.decode

What differs from SD 1.x is all here: two text encoders, the added conditions, the zeroed negative
conditioning, the VAE decoding in float32, the SDXL folder and single-file layouts. The loop itself is
`generate.py`'s (the added conditions ride along with the context, `denoisers.unet_backbone`), and
`denoising_end`/`denoising_start` split one schedule between the base and the refiner (§2.5, "ensemble of
expert denoisers"): the base runs the noisy steps and hands its latents over part-way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from .adapters import lora as lora_lib
from .adapters import textual_inversion
from .formats import sdxl, weights
from .generate import generate
from .images import ImageInput, image_to_tensor
from .models.configs import SDXLConfig
from .models.text_encoder import TextEncoder
from .models.tokenizer import Tokenizer
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .pipeline import StableDiffusion
from .diffusion.schedules import SchedulerConfig

Size = tuple[int, int]


class StableDiffusionXL(StableDiffusion):
    """SDXL: a U-Net with added conditions, its VAE, and two text encoders (the refiner: OpenCLIP bigG only)."""

    family = "sdxl"

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder | None, text_encoder_2: TextEncoder,
                 tokenizer: Tokenizer | None, tokenizer_2: Tokenizer, scheduler: SchedulerConfig, name: str = "model",
                 force_zeros_for_empty_prompt: bool | None = None):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, name)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        # no negative prompt: zeros for the unconditional branch (context and pooled), not the encoded "";
        # diffusers' `force_zeros_for_empty_prompt`: True for the base, False for the refiner (their model_index.json)
        self.force_zeros_for_empty_prompt = (text_encoder is not None if force_zeros_for_empty_prompt is None
                                             else force_zeros_for_empty_prompt)

    # ─── parts by role ─────────────────────────────────────────────────────────────────────────────
    @property
    def config(self) -> SDXLConfig:
        te = self.text_encoder.config if self.text_encoder is not None else None
        return SDXLConfig(self.unet.config, self.vae.config, te, self.text_encoder_2.config, self.scheduler)

    @property
    def text_encoders(self) -> list[TextEncoder]:
        """CLIP ViT-L then OpenCLIP bigG, the order their hidden states are joined (the refiner: bigG)."""
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizers(self) -> list[Tokenizer]:
        return [self.tokenizer, self.tokenizer_2] if self.text_encoder is not None else [self.tokenizer_2]

    @property
    def aesthetic(self) -> bool:
        """The refiner's time ids end in an aesthetic score (5 ids) instead of the target size (6)."""
        return self.config.time_ids_count == 5

    def __repr__(self) -> str:
        count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        encoders = " + ".join(f"{count(e):.1f}M" for e in self.text_encoders)
        return (f"StableDiffusionXL({self.name!r}, {self.image_size}px, device={self.device}, dtype={self.dtype}; "
                f"unet {count(self.unet):.1f}M, vae {count(self.vae):.1f}M, text encoders {encoders} params)")

    # ─── construction and saving ───────────────────────────────────────────────────────────────────
    @classmethod
    def from_config(cls, config: SDXLConfig, tokenizer: Tokenizer | None, tokenizer_2: Tokenizer,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> StableDiffusionXL:
        """Freshly initialised networks, the same for the same `seed` (the caller's random state is kept)."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            te = TextEncoder(config.text_encoder) if config.text_encoder is not None else None
            pipe = cls(UNet(config.unet), AutoencoderKL(config.vae), te, TextEncoder(config.text_encoder_2),
                       tokenizer if te is not None else None, tokenizer_2, config.scheduler, name="random")
        return pipe.to(device, dtype)

    @classmethod
    def _assemble_family(cls, parts: sdxl.SDXLComponents, tokenizer, device: torch.device, dtype: torch.dtype,
                         name: str, source: str) -> StableDiffusionXL:
        """The networks of `parts`, every key used and every shape checked; the tokenizers from the folder
        (a single file holds none: CLIP ViT-L's bundled BPE for both, padding the second with "!" as bigG's)."""
        with torch.device("meta"):
            nets = {"unet": UNet(parts.unet[0]), "vae": AutoencoderKL(parts.vae[0]),
                    "text_encoder": TextEncoder(parts.text_encoder[0]) if parts.text_encoder else None,
                    "text_encoder_2": TextEncoder(parts.text_encoder_2[0])}
        where = parts.sources or {}
        for key, module in nets.items():
            if module is not None:
                weights.load_strict(module, getattr(parts, key)[1], f"{where.get(key, source)} ({key})", dtype, device)
        tok, tok_2 = _tokenizers(parts, tokenizer, nets["text_encoder"] is not None)
        index_path = Path(source) / "model_index.json"
        index = weights.read_json(index_path, "model_index.json") if index_path.is_file() else {}
        return cls(nets["unet"], nets["vae"], nets["text_encoder"], nets["text_encoder_2"], tok, tok_2,
                   parts.scheduler, name=name, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"))

    def components(self) -> sdxl.SDXLComponents:
        """The four networks' configs and state dicts (what `formats.sdxl` writes; fused LoRAs inside the weights,
        LoRAs applied on the fly refused)."""
        pair = lambda m: (m.config, lora_lib.state_dict_to_save(m)) if m is not None else None  # noqa: E731
        return sdxl.SDXLComponents(unet=pair(self.unet), vae=pair(self.vae), text_encoder=pair(self.text_encoder),
                                   text_encoder_2=pair(self.text_encoder_2), scheduler=self.scheduler)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write diffusers' SDXL folder layout (safetensors), loadable by minisd and by diffusers'
        StableDiffusionXLPipeline (the refiner: StableDiffusionXLImg2ImgPipeline)."""
        folder = Path(folder)
        nets = [("unet", self.unet, "diffusion_pytorch_model", self.unet.config.to_diffusers()),
                ("vae", self.vae, "diffusion_pytorch_model", self.vae.config.to_diffusers())]
        nets += [(n, e, "model", e.config.to_transformers()) for n, e in
                 (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)) if e is not None]
        for name, module, fname, config in nets:
            weights.write_safetensors(lora_lib.state_dict_to_save(module), folder / name / f"{fname}.safetensors",
                                      {"format": "pt"})
            weights.write_json(config, folder / name / "config.json")
        weights.write_json(self.scheduler.to_diffusers("EulerDiscreteScheduler"), folder / "scheduler" / "scheduler_config.json")
        for name, tok in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2)):
            if tok is not None and (name == "tokenizer_2" or self.text_encoder is not None):
                tok.save(folder / name)
                # transformers writes the pad token into tokenizer_config.json only; Tokenizer (and older
                # readers) look for bigG's "!" in special_tokens_map.json, as SDXL's repos have it
                weights.write_json({"pad_token": tok.hf.pad_token}, folder / name / "special_tokens_map.json")
        weights.write_json(self._model_index(), folder / "model_index.json")  # last: marks the folder finished

    def _model_index(self) -> dict:
        base = self.text_encoder is not None
        clip = lambda cls: ["transformers", cls] if base else [None, None]  # noqa: E731
        index = {"_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
                 "_diffusers_version": "0.30.0", "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": clip("CLIPTextModel"),
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": clip("CLIPTokenizer"),
                 "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        return index if base else index | {"requires_aesthetics_score": True}

    @property
    def _lora_roots(self) -> dict:
        roots = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in roots.items() if module is not None}   # the refiner has one encoder

    # ─── textual inversion: one set of vectors per text encoder ────────────────────────────────────
    def load_textual_inversion(self, source, token: str | None = None) -> str:
        """An SDXL embedding: a .safetensors file (or state dict) holding `clip_l` and `clip_g` vectors, as
        AUTOMATIC1111 and kohya write them; the token is `token`, else the file's name. clip_l's vectors go to
        text_encoder (CLIP ViT-L), clip_g's to text_encoder_2 (OpenCLIP bigG; the refiner's only one), as
        diffusers' load_textual_inversion does when called once per encoder. Returns the token."""
        clip_l, clip_g = textual_inversion.read_sdxl_embedding(source, token)
        pairs = [(self.tokenizer_2, self.text_encoder_2, clip_g)]
        if self.text_encoder is not None:
            pairs.insert(0, (self.tokenizer, self.text_encoder, clip_l))
        for tokenizer, encoder, embedding in pairs:
            textual_inversion.check_embedding(tokenizer, encoder, embedding)   # all checked before any change
        if not self.textual_inversions:
            self._own_token_embeddings = [e.get_input_embeddings() for _, e, _ in pairs]
        ids = None
        for tokenizer, encoder, embedding in pairs:
            shared = ids if tokenizer is self.tokenizer_2 and self.tokenizer is self.tokenizer_2 else None
            ids = textual_inversion.add_embedding(tokenizer, encoder, embedding, ids=shared)
        self.textual_inversions[clip_g.token] = (clip_l, clip_g)
        return clip_g.token

    def unload_textual_inversion(self, token: str | None = None) -> None:
        """Remove one SDXL embedding (by its token) or all; with all gone, both tokenizers and text encoders
        are exactly as before the first load."""
        if token is not None and token not in self.textual_inversions:
            raise ValueError(f"no textual inversion with token {token!r}; loaded: {list(self.textual_inversions)}")
        if not self.textual_inversions:
            return
        kept = [pair for t, pair in self.textual_inversions.items() if token is not None and t != token]
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        for encoder, own in zip(encoders, self._own_token_embeddings):
            now = encoder.get_input_embeddings().weight
            encoder.set_input_embeddings(own.to(device=now.device, dtype=now.dtype))
        for tokenizer in {id(t): t for t in self.tokenizers if t is not None}.values():
            tokenizer.remove_added_tokens()
        self.textual_inversions.clear()
        for clip_l, clip_g in kept:
            self.load_textual_inversion({"clip_l": clip_l.vectors, "clip_g": clip_g.vectors}, clip_g.token)

    # ─── text conditioning ─────────────────────────────────────────────────────────────────────────
    @torch.inference_mode()
    def encode_text_xl(self, prompts: list[str], clip_skip: int = 0) -> tuple[Tensor, Tensor]:
        """(context (B, 77, E₁ + E₂), pooled (B, P)): each encoder's hidden state `clip_skip` layers before
        the penultimate (diffusers' `hidden_states[-(clip_skip + 2)]`), joined on channels; the pooled
        vector is the last encoder's (bigG's) projected EOS state."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            h, pooled = encoder.hidden_and_pooled(tokenizer(prompts).to(self.device), skip=1 + clip_skip)
            hidden.append(h)
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def encode_prompt_xl(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                         guidance_scale: float = 5.0, num_images_per_prompt: int = 1, clip_skip: int = 0
                         ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """((context, pooled), (uncond context, uncond pooled)), each repeated `num_images_per_prompt` times;
        the second is None without guidance, and zeros when no negative prompt is given and
        `force_zeros_for_empty_prompt` (diffusers' rule: an explicit "" is encoded)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        n = num_images_per_prompt
        cond = tuple(x.repeat_interleave(n, dim=0) for x in self.encode_text_xl(prompts, clip_skip))
        if guidance_scale <= 1.0:
            return cond, None
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return cond, (torch.zeros_like(cond[0]), torch.zeros_like(cond[1]))
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        return cond, tuple(x.repeat_interleave(n, dim=0) for x in self.encode_text_xl(negatives, clip_skip))

    def encode_prompt(self, prompt, negative_prompt=None, guidance_scale: float = 5.0, num_images_per_prompt: int = 1,
                      clip_skip: int = 0) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond) contexts, as `StableDiffusion.encode_prompt` (the pooled vectors: `encode_prompt_xl`)."""
        cond, uncond = self.encode_prompt_xl(prompt, negative_prompt, guidance_scale, num_images_per_prompt, clip_skip)
        return cond[0], None if uncond is None else uncond[0]

    def time_ids(self, original_size: Size, crops_coords_top_left: Size, target_size: Size,
                 aesthetic_score: float) -> Tensor:
        """SDXL's micro-conditioning (§2.2-2.3) as one row: original (h, w), crop (top, left), then target
        (h, w) for the base or the aesthetic score for the refiner. (1, n_ids)"""
        last = (aesthetic_score,) if self.aesthetic else tuple(target_size)
        ids = [*original_size, *crops_coords_top_left, *last]
        if len(ids) != self.config.time_ids_count:
            raise ValueError(f"original_size, crops_coords_top_left and target_size must be (h, w), (top, left) and "
                             f"(h, w) pairs, got {original_size}, {crops_coords_top_left}, {target_size}")
        return torch.tensor([ids], dtype=self.dtype, device=self.device)

    # ─── generation (the loop: generate.py) ────────────────────────────────────────────────────────
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 5.0, height: int | None = None,
                 width: int | None = None, sampler: str = "euler", *, original_size: Size | None = None,
                 crops_coords_top_left: Size = (0, 0), target_size: Size | None = None,
                 negative_original_size: Size | None = None, negative_crops_coords_top_left: Size = (0, 0),
                 negative_target_size: Size | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, denoising_start: float | None = None,
                 denoising_end: float | None = None, num_images_per_prompt: int = 1, clip_skip: int = 0,
                 latents: Tensor | None = None, image: ImageInput | None = None, strength: float = 1.0, **kwargs):
        """Text to image (or, with `image` and `strength`, image to image; `inpaint` for a mask), as diffusers'
        StableDiffusionXLPipeline. Returns what `StableDiffusion.__call__` returns.

        Micro-conditioning (default: the output size, no crop): original_size and target_size (h, w) in
        pixels, crops_coords_top_left (top, left). The unconditional branch reads the same ids unless both
        negative_original_size and negative_target_size are given (with negative_crops_coords_top_left, default
        (0, 0)). The refiner reads aesthetic_score instead of target_size, and its unconditional branch
        negative_original_size (default original_size), negative_crops_coords_top_left and
        negative_aesthetic_score. (diffusers' StableDiffusionXLPipeline and its Img2Img pipeline, exactly.)
        Base → refiner: base(..., denoising_end=0.8, output_type="latent") runs the first 80% of the noise
        levels and returns its latents part-way; refiner(..., latents=those, denoising_start=0.8) the rest.
        The other keyword arguments (seed, generator, eta, karras, callback, output_type, and with an SDXL
        ControlNet loaded control_image, controlnet_scale, control_start, control_end, guess_mode) are those
        of `StableDiffusion.__call__`."""
        if kwargs.get("mask_image") is not None and image is None:
            raise ValueError("mask_image needs an image to repaint: call pipe.inpaint(prompt, image, mask_image)")
        control = self._control(*(kwargs.pop(k, None) for k in ("control_image", "controlnet_scale", "control_start",
                                                                 "control_end", "guess_mode")))
        if latents is not None and denoising_start is not None:  # the size of the handed-over latents
            height, width = (s * self.vae.config.downsampling for s in latents.shape[-2:])
        if image is not None:  # the size generate reads the image at
            size = tuple(image_to_tensor(image, height, width).shape[-2:])
        else:
            size = (height or self.image_size, width or self.image_size)
        cond, uncond = self.encode_prompt_xl(prompt, negative_prompt, guidance_scale, num_images_per_prompt, clip_skip)
        ids = self.time_ids(original_size or size, crops_coords_top_left, target_size or size, aesthetic_score)
        rows = cond[0].shape[0]
        added = {"pooled": cond[1], "time_ids": ids.repeat(rows, 1)}
        if uncond is not None:  # [∅, c]: the order with_cfg stacks the context in
            if self.aesthetic or (negative_original_size and negative_target_size):
                neg_ids = self.time_ids(negative_original_size or original_size or size,
                                        negative_crops_coords_top_left, negative_target_size, negative_aesthetic_score)
            else:
                neg_ids = ids
            added = {"pooled": torch.cat([uncond[1], cond[1]]),
                     "time_ids": torch.cat([neg_ids.repeat(rows, 1), ids.repeat(rows, 1)])}
        return generate(self, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, height=height, width=width, sampler=sampler, latents=latents,
                        num_images_per_prompt=num_images_per_prompt, image=image, strength=strength,
                        encoded=(cond[0], None if uncond is None else uncond[0]), added=added,
                        denoising_start=denoising_start, denoising_end=denoising_end,
                        upcast_vae=self.vae.config.force_upcast, control=control, **kwargs)

    def img2img(self, prompt: str | list[str], image, strength: float = 0.3, **kwargs):
        """Image to image (the refiner's use, as diffusers' StableDiffusionXLImg2ImgPipeline; strength 0.3 by
        default). The other keyword arguments are those of `__call__`."""
        if image is None:
            raise ValueError("img2img needs an image (a picture, a path, or a tensor in [0, 1]); "
                             "for text to image call pipe(...)")
        return self(prompt, image=image, strength=strength, **kwargs)

    def inpaint(self, prompt: str | list[str], image, mask_image, strength: float = 0.75, keep_unmasked: bool = True,
                *, masked_content: str = "fill", mask_blur: float = 2.0, **kwargs):
        """Repaint where mask_image is white, with the base U-Net (its 4 channels): the known latents pasted back
        outside the mask after every step, as diffusers' StableDiffusionXLInpaintPipeline does with such a
        U-Net. The defaults are AUTOMATIC1111's, as `StableDiffusion.inpaint`'s; diffusers' way is
        strength=0.9999 (its default), keep_unmasked=False, masked_content="original". The other keyword
        arguments are those of `__call__`."""
        if image is None or mask_image is None:
            missing = "image" if image is None else "mask_image"
            raise ValueError(f"inpaint needs an image and a mask_image, got no {missing}")
        if self.unet.config.in_channels != self.unet.config.out_channels:
            raise ValueError(f"this SDXL U-Net reads {self.unet.config.in_channels} channels: minisd inpaints "
                             f"with SDXL's 4-channel U-Net only")
        return self(prompt, image=image, mask_image=mask_image, strength=strength, keep_unmasked=keep_unmasked,
                    masked_content=masked_content, mask_blur=mask_blur, **kwargs)


def _tokenizers(parts: sdxl.SDXLComponents, given, two: bool) -> tuple[Tokenizer | None, Tokenizer]:
    """(tokenizer, tokenizer_2): the folder's, else `given` for both (a folder, or a Tokenizer), else CLIP
    ViT-L's bundled BPE; bigG's tokenizer pads with "!" (id 0) where CLIP's pads with its EOS."""
    folders = parts.tokenizer_folders
    toks = []
    for i, folder in enumerate(folders):
        if isinstance(given, Tokenizer):
            tok = given
        elif given is not None:
            tok = Tokenizer(given)
        elif folder is not None:
            tok = Tokenizer(folder)
        else:
            tok = Tokenizer.clip_vit_l()
            if i == 1:
                tok.hf.pad_token = "!"
                tok.pad_id = tok.hf.pad_token_id
        toks.append(tok)
    vocab = parts.text_encoder_2[0].vocab_size
    for tok in toks:
        if len(tok) > vocab:
            raise weights.WeightsError(f"tokenizer {tok.folder} has {len(tok)} tokens but the SDXL text encoders "
                                       f"only {vocab}: wrong tokenizer?")
    return (toks[0] if two else None), toks[1]


def save_single_file(pipe: StableDiffusionXL, path: str | os.PathLike) -> None:
    """Stability's generative-models single-file layout (`sd_xl_base_1.0.safetensors`) as .safetensors, as
    A1111/ComfyUI and diffusers' from_single_file read it; minisd's config rides along in the metadata, so
    other sizes load back exactly."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_single_file writes .safetensors only, got {path.name!r}")
    weights.write_safetensors(sdxl.to_sdxl_single_file(pipe.components()), path,
                              metadata={"format": "pt", "minisd_config": pipe.config.to_json()})
