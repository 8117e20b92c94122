"""`StableDiffusion3`: SD 3 (Esser et al. 2024) — an MMDiT trained with rectified flow — on minisd's pieces.

    prompt ─ tokenizer   ─ CLIP ViT-L ─ penultimate layer (B, 77, 768)  ┐ joined on channels (B, 77, 2048),
           ├ tokenizer_2 ─ CLIP bigG  ─ penultimate layer (B, 77, 1280) ┘ zero-padded to 4096 ┐ joined on tokens:
           │                            projected EOS vectors: pooled = [768 ‖ 1280] (B, 2048) │ (B, 333, 4096)
           └ tokenizer_3 ─ T5-XXL     ─ last layer (B, 256, 4096) (zeros without T5) ──────────┘
    noise z_1 ─ flow Euler, σ 1 -> 0: v̂ = transformer(z_σ, context, pooled, t = 1000·σ), with CFG ─ z_0
    z_0 / scaling_factor + shift_factor ─ vae.decode ─ image

The tiny variant (the shapes world) has one CLIP encoder and no projection: context = its last hidden state
(B, 77, E), pooled = its final-LayerNorm EOS state (B, E); which one a model is follows from its parts.

What differs from SD 1.x is all here: three text encoders and the padding that joins them, the pooled text,
the VAE's shift, the folder and single-file layouts (formats/sd3.py). The loop is generate.py's steps — the
schedule, the initial noise, the sampler, the decoding — around `denoisers.mmdit_backbone`, the one place
the transformer is called, with the pooled text riding along as SDXL's added conditions do.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import generate as gen
from .diffusion import denoisers as dn
from .diffusion.schedules import SchedulerConfig
from .formats import sd3, weights
from .formats.files import atomic_write_text
from .images import to_pil
from .models.mmdit import MMDiT
from .models.t5 import T5Encoder
from .models.text_encoder import TextEncoder
from .models.tokenizer import Tokenizer
from .models.tokenizer_t5 import T5Tokenizer
from .models.vae import AutoencoderKL
from .pipeline import StableDiffusion

MAX_SEQUENCE_LENGTH = 512  # diffusers refuses longer T5 sequences


class StableDiffusion3(StableDiffusion):
    """SD 3: an MMDiT (`transformer`), a 16-channel VAE, CLIP ViT-L and bigG, optionally T5-XXL; or the tiny
    variant (one CLIP encoder). `unet`, the base class's slot for the denoiser, holds the same transformer."""

    family = "sd3"

    def __init__(self, transformer: MMDiT, vae: AutoencoderKL, text_encoder: TextEncoder, tokenizer: Tokenizer,
                 scheduler: SchedulerConfig, text_encoder_2: TextEncoder | None = None,
                 tokenizer_2: Tokenizer | None = None, text_encoder_3: T5Encoder | None = None,
                 tokenizer_3: T5Tokenizer | None = None, name: str = "model"):
        super().__init__(transformer, vae, text_encoder, tokenizer, scheduler, name)
        self.transformer = transformer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        if (text_encoder_2 is None) != (tokenizer_2 is None) or (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_2 and text_encoder_3 each come with their tokenizer (both or neither)")
        self.config  # noqa: B018 — the networks fit together (SD3Config's checks), or one ValueError line

    # ─── parts by role ─────────────────────────────────────────────────────────────────────────────
    @property
    def config(self) -> sd3.SD3Config:
        part = lambda m: m.config if m is not None else None  # noqa: E731
        return sd3.SD3Config(self.transformer.config, self.vae.config, self.text_encoder.config,
                             part(self.text_encoder_2), part(self.text_encoder_3), self.scheduler)

    @property
    def is_tiny(self) -> bool:
        """The shapes world's variant: one CLIP encoder, its hidden state and EOS state the conditioning."""
        return self.text_encoder_2 is None

    @property
    def device(self) -> torch.device:
        return self.transformer.proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    @property
    def backbone(self) -> MMDiT:
        """The denoiser network: v̂ = backbone(z_σ, context, pooled, t)."""
        return self.transformer

    @property
    def text_encoders(self) -> list[nn.Module]:
        """CLIP ViT-L, bigG, T5: the order their outputs are joined (the tiny variant: one CLIP)."""
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.tokenizer, self.tokenizer_2, self.tokenizer_3) if t is not None]

    @property
    def _lora_roots(self) -> dict:
        return {}

    def __repr__(self) -> str:
        count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        encoders = " + ".join(f"{count(e):.1f}M" for e in self.text_encoders)
        return (f"StableDiffusion3({self.name!r}{', tiny' if self.is_tiny else ''}, {self.image_size}px, "
                f"device={self.device}, dtype={self.dtype}; transformer {count(self.transformer):.1f}M, "
                f"vae {count(self.vae):.1f}M, text encoders {encoders} params)")

    # ─── construction ──────────────────────────────────────────────────────────────────────────────
    @classmethod
    def from_config(cls, config: sd3.SD3Config, tokenizer: Tokenizer, tokenizer_2: Tokenizer | None = None,
                    tokenizer_3: T5Tokenizer | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> StableDiffusion3:
        """Freshly initialised networks, the same for the same `seed` (the caller's random state is kept)."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            te2 = TextEncoder(config.text_encoder_2) if config.text_encoder_2 is not None else None
            t5 = T5Encoder(config.text_encoder_3) if config.text_encoder_3 is not None else None
            pipe = cls(MMDiT(config.transformer), AutoencoderKL(config.vae), TextEncoder(config.text_encoder),
                       tokenizer, config.scheduler, te2, tokenizer_2 if te2 is not None else None, t5,
                       tokenizer_3 if t5 is not None else None, name="random")
        return pipe.to(device, dtype)

    @classmethod
    def tiny(cls, transformer: MMDiT, vae: AutoencoderKL, text_encoder: TextEncoder, tokenizer: Tokenizer,
             flow_shift: float = 1.0, name: str = "tiny_mmdit") -> StableDiffusion3:
        """The tiny variant from its networks: the text encoder's hidden state is the context, its EOS state
        the pooled text; sampled along the flow with `flow_shift` (σ -> sσ/(1 + (s−1)σ))."""
        return cls(transformer, vae, text_encoder, tokenizer, SchedulerConfig(prediction_type="flow", shift=flow_shift),
                   name=name)

    @classmethod
    def _assemble_family(cls, parts: sd3.SD3Components, tokenizer, device: torch.device, dtype: torch.dtype,
                         name: str, source: str) -> StableDiffusion3:
        """The networks of `parts`, every key used and every shape checked, and the tokenizers: the folder's,
        else `tokenizer`'s (an SD 3 folder holding tokenizer/, tokenizer_2/, tokenizer_3/, a CLIP tokenizer
        folder, or a Tokenizer), else CLIP ViT-L's bundled BPE (a T5 has no bundled tokenizer)."""
        config = parts.config(source)
        with torch.device("meta"):
            nets = {"transformer": MMDiT(config.transformer), "vae": AutoencoderKL(config.vae),
                    "text_encoder": TextEncoder(config.text_encoder),
                    "text_encoder_2": TextEncoder(config.text_encoder_2) if parts.text_encoder_2 else None,
                    "text_encoder_3": T5Encoder(config.text_encoder_3) if parts.text_encoder_3 else None}
        where = parts.sources or {}
        for key, module in nets.items():
            if module is not None:
                weights.load_strict(module, getattr(parts, key)[1], f"{where.get(key, source)} ({key})", dtype, device)
        tok, tok_2, tok_3 = _tokenizers(parts, tokenizer, config, source)
        return cls(nets["transformer"], nets["vae"], nets["text_encoder"], tok, parts.scheduler, nets["text_encoder_2"],
                   tok_2, nets["text_encoder_3"], tok_3, name=name)

    # ─── saving ────────────────────────────────────────────────────────────────────────────────────
    def components(self) -> sd3.SD3Components:
        """The networks' configs and state dicts (what `formats.sd3` writes)."""
        pair = lambda m: (m.config, m.state_dict()) if m is not None else None  # noqa: E731
        return sd3.SD3Components(transformer=pair(self.transformer), vae=pair(self.vae),
                                 text_encoder=pair(self.text_encoder), text_encoder_2=pair(self.text_encoder_2),
                                 text_encoder_3=pair(self.text_encoder_3), scheduler=self.scheduler)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write diffusers' SD 3 folder layout (safetensors): the full model loads in diffusers'
        StableDiffusion3Pipeline, the tiny variant's transformer/ in its SD3Transformer2DModel."""
        folder = Path(folder)
        nets = [("transformer", self.transformer, "diffusion_pytorch_model", self.transformer.config.to_diffusers()),
                ("vae", self.vae, "diffusion_pytorch_model", self.vae.config.to_diffusers())]
        nets += [(n, e, "model", e.config.to_transformers()) for n, e in
                 (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2),
                  ("text_encoder_3", self.text_encoder_3)) if e is not None]
        for name, module, fname, config in nets:
            sd = sd3.t5_keys_to_save(module.state_dict()) if name == "text_encoder_3" else module.state_dict()
            weights.write_safetensors(sd, folder / name / f"{fname}.safetensors", {"format": "pt"})
            weights.write_json(config, folder / name / "config.json")
        weights.write_json(self.scheduler.to_diffusers("FlowMatchEulerDiscreteScheduler"),
                           folder / "scheduler" / "scheduler_config.json")
        for name, tok in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2)):
            if tok is not None:
                tok.save(folder / name)
                # the pad token (bigG's "!") where Tokenizer and older readers look for it, as SD 3's repos have it
                weights.write_json({"pad_token": tok.hf.pad_token}, folder / name / "special_tokens_map.json")
        if self.tokenizer_3 is not None:
            save_t5_tokenizer(self.tokenizer_3, folder / "tokenizer_3")
        weights.write_json(self._model_index(), folder / "model_index.json")  # last: marks the folder finished

    def _model_index(self) -> dict:
        def entry(present: bool, library: str, cls: str) -> list:
            return [library, cls] if present else [None, None]

        full, t5 = not self.is_tiny, self.text_encoder_3 is not None
        return {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0",
                "feature_extractor": [None, None], "image_encoder": [None, None],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection" if full else "CLIPTextModel"],
                "text_encoder_2": entry(full, "transformers", "CLIPTextModelWithProjection"),
                "text_encoder_3": entry(t5, "transformers", "T5EncoderModel"),
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": entry(full, "transformers", "CLIPTokenizer"),
                "tokenizer_3": entry(t5, "transformers", "T5TokenizerFast"),
                "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}

    # ─── text conditioning ─────────────────────────────────────────────────────────────────────────
    @torch.inference_mode()
    def encode_text_sd3(self, prompts: list[str], max_sequence_length: int = 256,
                        clip_skip: int = 0) -> tuple[Tensor, Tensor]:
        """(context (B, T, joint_attention_dim), pooled (B, P)), as diffusers' StableDiffusion3Pipeline.encode_prompt:
        each CLIP's hidden state `clip_skip` layers before the penultimate (`hidden_states[-(clip_skip + 2)]`), no
        final LayerNorm, joined on channels and zero-padded to the T5 width, then T5's tokens after them (T = 77 +
        max_sequence_length); pooled: the two projected EOS vectors joined. Tiny variant: see the module docstring."""
        if self.is_tiny:
            ids = self.tokenizer(prompts).to(self.device)
            hidden = self.text_encoder(ids, clip_skip=clip_skip)  # (B, 77, E), after the final LayerNorm
            return hidden.to(self.dtype), self.text_encoder.pooled(ids, hidden).to(self.dtype)
        hidden, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            h, p = encoder.hidden_and_pooled(tokenizer(prompts).to(self.device), skip=1 + clip_skip)
            hidden.append(h)
            pooled.append(p)
        clip = torch.cat(hidden, dim=-1)  # (B, 77, E₁ + E₂)
        t5 = self.encode_t5(prompts, max_sequence_length).to(clip.dtype)  # (B, max_sequence_length, D)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, D)
        return torch.cat([clip, t5], dim=1).to(self.dtype), torch.cat(pooled, dim=-1).to(self.dtype)

    @torch.inference_mode()
    def encode_t5(self, prompts: list[str], max_sequence_length: int = 256) -> Tensor:
        """T5's last hidden state (B, max_sequence_length, D); without a T5, zeros of that shape (D: the
        transformer's joint_attention_dim), as diffusers' pipeline gives with text_encoder_3=None."""
        if self.text_encoder_3 is None:
            width = self.transformer.config.joint_attention_dim
            return torch.zeros(len(prompts), max_sequence_length, width, device=self.device, dtype=self.dtype)
        tokenizer = copy.copy(self.tokenizer_3)  # the same vocabulary, this call's length
        tokenizer.max_length = max_sequence_length
        return self.text_encoder_3(tokenizer(prompts).to(self.device))

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      guidance_scale: float = 7.0, num_images_per_prompt: int = 1, clip_skip: int = 0,
                      max_sequence_length: int = 256) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
        """((context, pooled), (uncond context, uncond pooled)), each repeated `num_images_per_prompt` times;
        the second is None without guidance (guidance_scale <= 1), else the negative prompt's (or ""'s:
        SD 3 has no zeroed unconditional branch). As diffusers, the negative prompt ignores clip_skip."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        check_sequence_length(max_sequence_length)
        n = num_images_per_prompt
        encoded = self.encode_text_sd3(prompts, max_sequence_length, clip_skip)
        cond = tuple(x.repeat_interleave(n, dim=0) for x in encoded)
        if guidance_scale <= 1.0:
            return cond, None
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        uncond = tuple(x.repeat_interleave(n, dim=0) for x in self.encode_text_sd3(negatives, max_sequence_length))
        return cond, uncond

    # ─── generation ────────────────────────────────────────────────────────────────────────────────
    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 28, guidance_scale: float = 7.0, height: int | None = None,
                 width: int | None = None, sampler: str | None = None, karras: bool = False, eta: float = 0.0,
                 seed: int | None = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 num_images_per_prompt: int = 1, callback=None, output_type: str = "pil", clip_skip: int = 0,
                 max_sequence_length: int = 256):
        """Text to image, as diffusers' StableDiffusion3Pipeline (the same weights, prompts, latents and
        steps give the same image). Returns a list of PIL images ("pil"), (B, 3, H, W) in [0, 1] ("pt"), or
        the final latents before the VAE's scale and shift are undone ("latent").

        sampler: "flow_euler" (FlowMatchEulerDiscreteScheduler, the scheduler config's shift). latents: the
        initial noise (B, C, h, w), z_1. max_sequence_length: T5's tokens (1..512). The other arguments are
        `StableDiffusion.__call__`'s."""
        sampler = sampler or "flow_euler"
        height = self.image_size if height is None else height
        width = self.image_size if width is None else width
        gen.check_arguments(sampler, output_type, num_inference_steps, height, width, 1.0, guidance_scale, eta,
                            False, False, False)
        multiple = self.vae.config.downsampling * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} (the VAE's "
                             f"{self.vae.config.downsampling} × the {self.transformer.config.patch_size}-latent "
                             f"patches), got {height}x{width}")
        generator = gen.seeded(seed, generator)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, guidance_scale, num_images_per_prompt, clip_skip,
                                          max_sequence_length)
        for x in (*cond, *(uncond or ())):
            dn.check_finite(x, "text encoder", self.nan_check)
        schedule = gen.start_schedule(self, sampler, num_inference_steps, karras, None)
        f = self.vae.config.downsampling
        shape = (cond[0].shape[0], self.transformer.config.in_channels, height // f, width // f)
        start = gen.txt2img_start(self, schedule, shape, latents, generator)
        check = dn.FiniteCheck(self.nan_check, schedule.timesteps)
        denoiser = self._denoiser(cond, uncond, guidance_scale, schedule, check)
        z = gen.sample(self, sampler, denoiser, start, schedule, eta, generator, callback)
        check.flush()
        if output_type == "latent":
            return z
        # decode_latents divides by scaling_factor; diffusers decodes z / scaling_factor + shift_factor
        images = gen.decode_latents(self, z + self.vae.shift_factor * self.vae.scaling_factor)
        return images if output_type == "pt" else to_pil(images)

    def _denoiser(self, cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor] | None, guidance_scale: float,
                  schedule, check: dn.FiniteCheck) -> dn.Guided:
        """(z_σ, t) -> the guided velocity: the transformer with its pooled text, the finite check, CFG."""
        pooled = cond[1] if uncond is None else torch.cat([uncond[1], cond[1]])  # [∅, c], as with_cfg stacks
        net = dn.mmdit_backbone(self.transformer, dn.timesteps_on_device(schedule.timesteps, self.device), pooled)
        if self.compile_mode in gen.CUDA_GRAPH_MODES:  # the graph's output buffer is overwritten by the next replay
            net = dn.copy_output(net)
        net = check.net(net, "transformer")
        return dn.with_cfg(net, cond[0], None if uncond is None else uncond[0], guidance_scale)

    # ─── what the SD 3 pipeline does not do ────────────────────────────────────────────────────────
    def _unsupported(self, what: str):
        raise ValueError(f"{what} is not available for SD 3 models in minisd: it generates text to image "
                         f"(pipe(prompt, ...)); {what} works with SD 1.x/2.x and SDXL")

    def img2img(self, *args, **kwargs):
        self._unsupported("img2img")

    def inpaint(self, *args, **kwargs):
        self._unsupported("inpainting")

    def invert(self, *args, **kwargs):
        self._unsupported("DDIM inversion")

    def edit(self, *args, **kwargs):
        self._unsupported("prompt-to-prompt editing")

    def load_controlnet(self, *args, **kwargs):
        self._unsupported("a ControlNet")

    def load_lora(self, *args, **kwargs):
        self._unsupported("a LoRA")

    def load_textual_inversion(self, *args, **kwargs):
        self._unsupported("textual inversion")

    def load_motion_module(self, *args, **kwargs):
        self._unsupported("a motion module")

    def video(self, *args, **kwargs):
        self._unsupported("video")

    def enable_model_cpu_offload(self, *args, **kwargs):
        self._unsupported("model CPU offload")

    def fuse_qkv_projections(self, fused: bool = True) -> None:
        self._unsupported("fusing QKV projections")


def check_sequence_length(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be an integer in 1..{MAX_SEQUENCE_LENGTH}, got {n!r}")


def save_t5_tokenizer(tokenizer: T5Tokenizer, folder: Path) -> None:
    """tokenizer.json and the tokenizer_config.json transformers' T5TokenizerFast reads it with (its sentinel
    tokens counted as `extra_ids`, which the file already holds)."""
    vocab = tokenizer.tokenizer.get_vocab()
    extra = sum(1 for token in vocab if token.startswith("<extra_id_"))
    atomic_write_text(folder / "tokenizer.json", tokenizer.tokenizer.to_str())
    weights.write_json({"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>",
                        "unk_token": "<unk>", "extra_ids": extra, "model_max_length": MAX_SEQUENCE_LENGTH},
                       folder / "tokenizer_config.json")


def _tokenizers(parts: sd3.SD3Components, given, config: sd3.SD3Config, source: str):
    """(tokenizer, tokenizer_2, tokenizer_3) for the networks of `parts` (where from: `_assemble_family`'s
    docstring); bigG's bundled fallback pads with "!" (id 0) as SD 3's tokenizer_2 does; each CLIP vocabulary
    checked against its encoder."""
    folders = list(parts.tokenizer_folders)
    if given is not None and not isinstance(given, Tokenizer) and (Path(given) / "tokenizer").is_dir():
        folders = [p if p.is_dir() else None for p in (Path(given) / n for n in ("tokenizer", "tokenizer_2",
                                                                                  "tokenizer_3"))]
        given = None
    toks = []
    for i in range(1 if config.tiny else 2):
        if isinstance(given, Tokenizer):
            tok = given
        elif given is not None or folders[i] is not None:
            tok = Tokenizer(given if given is not None else folders[i])
        else:
            tok = Tokenizer.clip_vit_l()
            if i == 1:
                tok.hf.pad_token = "!"
                tok.pad_id = tok.hf.pad_token_id
        vocab = (config.text_encoder, config.text_encoder_2)[i].vocab_size
        if len(tok) > vocab:
            raise weights.WeightsError(f"tokenizer {tok.folder} has {len(tok)} tokens but the text encoder of "
                                       f"{source} only {vocab}: wrong tokenizer?")
        toks.append(tok)
    t5 = None
    if config.text_encoder_3 is not None:
        if folders[2] is None:
            raise weights.WeightsError(f"{source} holds a T5 text encoder but no T5 tokenizer: pass tokenizer= an SD 3 "
                                       f"folder holding tokenizer_3/tokenizer.json")
        t5 = T5Tokenizer(folders[2])
    return toks[0], (toks[1] if len(toks) > 1 else None), t5


def save_single_file(pipe: StableDiffusion3, path: str | os.PathLike) -> None:
    """Stability's SD 3 single-file layout (`sd3_medium_incl_clips*.safetensors`) as .safetensors, as
    ComfyUI and diffusers' from_single_file read it; minisd's config rides along in the metadata, so other
    sizes (and the tiny variant) load back exactly."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_single_file writes .safetensors only, got {path.name!r}")
    weights.write_safetensors(sd3.to_sd3_single_file(pipe.components()), path,
                              metadata={"format": "pt", "minisd_config": pipe.config.to_json()})
