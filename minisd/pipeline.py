"""`StableDiffusion`: the five components in one object, loaded from anywhere, and the generation loop.

    prompt ─ tokenizer ─ text_encoder ─ context ┐
    noise z_T ─────────────────────── sampler loop: ε̂ = unet(z_t, t, context), with CFG ─ z_0 ─ vae.decode ─ image
                                       (schedule: scheduler config)

Generation (txt2img, img2img, inpainting) lives in `generate.py`; this file is the object and its I/O.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from . import editing, families, fast
from .formats import motion as motion_files
from .formats import weights
from .adapters import lora as lora_lib
from .adapters import textual_inversion
from .models.configs import ModelConfig
from .adapters.controlnet import ControlNet, ControlOptions, load_controlnet
from .generate import generate, generate_video
from .diffusion.schedules import SchedulerConfig
from .models.text_encoder import TextEncoder
from .models.tokenizer import Tokenizer
from .models.motion import ANIMATEDIFF_SD15_V2, MotionAdapter, MotionAdapterConfig, VideoUNet
from .models.unet import UNet, UNetConfig
from .models.vae import AutoencoderKL

DATA = Path(__file__).resolve().parent.parent / "data"
TINY_PATH = DATA / "tiny"


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


class StableDiffusion:
    """A text-to-image latent diffusion model: tokenizer, text_encoder, unet, vae and its schedule."""

    def __init__(self, unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder, tokenizer: Tokenizer,
                 scheduler: SchedulerConfig, name: str = "model"):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        # the VAE's convolutions at full image resolution run ~12% faster channels-last (NHWC) on CPU;
        # the U-Net, with its attention reshapes, does not gain (docs/benchmarks.md measures both)
        vae.to(memory_format=torch.channels_last)
        self.scheduler = scheduler
        self.name = name
        self.progress = True  # tqdm bar over the sampling steps; set False (or TQDM_DISABLE=1) to hide
        self.controlnets: list = []  # ControlNets used by every generation call (load_controlnet)
        self.loras: dict[str, dict[str, lora_lib.LoRA]] = {}  # name -> {module path: LoRA} (load_lora)
        self.textual_inversions: dict[str, textual_inversion.Embedding] = {}  # token -> embedding (load_textual_inversion)
        self._own_token_embedding = None  # the text encoder's token embedding before any textual inversion
        self.vae_slicing = False  # decode a batch one image at a time (peak memory of one image)
        self.vae_tiling = False   # decode each image in overlapping tiles (pictures larger than native)
        self._offload: fast.ModelOffload | None = None  # enable_model_cpu_offload
        self.compile_mode: str | None = None  # set by compile(); "reduce-overhead"/"max-autotune" replay CUDA graphs
        self.nan_check = "error"  # a network's NaN/inf output: "error" stops generation, "warn" warns, "off"
        self.video_unet: VideoUNet | None = None  # the U-Net with a motion module, for pipe.video (load_motion_module)
        self.motion_extras: list = []  # what a motion module folder added: its words, ("lora", name)

    # ─── properties ────────────────────────────────────────────────────────────────────────────────
    @property
    def device(self) -> torch.device:
        """Where generation runs: the U-Net's device (or the offload target, see enable_model_cpu_offload)."""
        return self._offload.device if self._offload is not None else self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def config(self) -> ModelConfig:
        return ModelConfig(self.unet.config, self.vae.config, self.text_encoder.config, self.scheduler)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # ─── parts by role (minisd.families): what generation and the adapters rely on, whatever the family ──────
    family = "sd1"

    @property
    def backbone(self) -> UNet:
        """The denoiser network: ε̂ (or v̂) = backbone(z_t, t, context). SD 1.x/2.x: the U-Net."""
        return self.unet

    @property
    def autoencoder(self) -> AutoencoderKL:
        return self.vae

    @property
    def text_encoders(self) -> list[TextEncoder]:
        """The text encoders, in the order their outputs are joined (SD 1.x: one)."""
        return [self.text_encoder]

    @property
    def tokenizers(self) -> list[Tokenizer]:
        return [self.tokenizer]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        if device is not None:
            self.disable_model_cpu_offload()
        for m in (self.backbone, self.vae, *self.text_encoders, *self.controlnets):  # LoRAs included: in the tree
            m.to(device=device, dtype=dtype)
        if self.video_unet is not None:  # its U-Net moved above; the motion module with it
            self.video_unet.adapter.to(device=device, dtype=dtype)
        self.vae.to(memory_format=torch.channels_last)
        return self

    def __repr__(self) -> str:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return (f"StableDiffusion({self.name!r}, {self.image_size}px, device={self.device}, dtype={self.dtype}; "
                f"unet {count(self.unet) / 1e6:.1f}M, vae {count(self.vae) / 1e6:.1f}M, "
                f"text_encoder {count(self.text_encoder) / 1e6:.1f}M params)")

    # ─── construction ──────────────────────────────────────────────────────────────────────────────
    @classmethod
    def from_config(cls, config: ModelConfig, tokenizer: Tokenizer, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> StableDiffusion:
        """Freshly initialised networks (for training, tests and shape tracing): the same weights for the same
        `seed`. They are built on the CPU under a generator of their own, so the caller's random state is
        left as it was."""
        with torch.random.fork_rng(devices=[]):  # the CPU generator is restored on exit; no other is touched
            torch.default_generator.manual_seed(seed)
            pipe = cls(UNet(config.unet), AutoencoderKL(config.vae), TextEncoder(config.text_encoder), tokenizer,
                       config.scheduler, name="random")
        return pipe.to(device, dtype)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = "tiny", device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, variant: str | None = None,
                        tokenizer: str | os.PathLike | Tokenizer | None = None) -> StableDiffusion:
        """Load from "tiny", a diffusers folder, a single-file .safetensors/.ckpt, or a Hub repo id.

        device: default CUDA, else MPS, else CPU. dtype: default fp16 on CUDA, fp32 elsewhere.
        variant: e.g. "fp16" reads `*.fp16.safetensors` of a diffusers folder.
        tokenizer: a folder or Tokenizer; single files hold none (default: CLIP ViT-L/14's, bundled).
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        path, name = locate(source, variant)
        if path.is_dir():
            family = families.family_of_folder(path)
            families.check_generates(family, path)
            parts = family.read_folder(path, variant)
        else:
            state_dict = weights.read_state_dict(path)
            family = families.family_of_state_dict(state_dict)
            families.check_generates(family, path)
            parts = family.read_single_file(state_dict, str(path), weights.read_metadata(path))
        pipeline_class = family_pipeline(family.name)
        if not issubclass(pipeline_class, cls):
            raise ValueError(f"{path} is an {family.title}; load it with {pipeline_class.__name__}.from_pretrained "
                             f"or StableDiffusion.from_pretrained, not {cls.__name__}")
        if pipeline_class is not StableDiffusion:  # another family's class assembles its parts (SDXL: pipeline_xl)
            return pipeline_class._assemble_family(parts, tokenizer, device, dtype, name, str(path))
        if isinstance(tokenizer, Tokenizer):
            tok = tokenizer
        elif tokenizer is not None:
            tok = Tokenizer(tokenizer)
        elif parts.tokenizer_folder is not None:
            tok = Tokenizer(parts.tokenizer_folder)
        else:
            tok = Tokenizer.clip_vit_l()
        if len(tok) > parts.text_encoder[0].vocab_size:
            raise weights.WeightsError(f"tokenizer {tok.folder} has {len(tok)} tokens but the text encoder of "
                                       f"{path} only {parts.text_encoder[0].vocab_size}: wrong tokenizer?")
        return cls._assemble(parts, tok, device, dtype, name, str(path))

    @classmethod
    def _assemble(cls, parts: weights.Components, tok: Tokenizer, device: torch.device, dtype: torch.dtype,
                  name: str, source: str) -> StableDiffusion:
        with torch.device("meta"):  # no time spent on random init: every tensor comes from the file
            unet, vae = UNet(parts.unet[0]), AutoencoderKL(parts.vae[0])
            text_encoder = TextEncoder(parts.text_encoder[0])
        where = parts.sources or {}
        for key, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
            state_dict = getattr(parts, key)[1]
            weights.load_strict(module, state_dict, f"{where.get(key, source)} ({key})", dtype, device)
        return cls(unet, vae, text_encoder, tok, parts.scheduler, name=name)

    # ─── saving ────────────────────────────────────────────────────────────────────────────────────
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the diffusers folder layout (safetensors), loadable by minisd and by diffusers. Fused
        LoRAs are saved inside the weights; LoRAs applied on the fly are refused (fuse or unload them)."""
        folder = Path(folder)
        weights.write_diffusers_folder(
            folder, (self.unet.config, lora_lib.state_dict_to_save(self.unet)), (self.vae.config, self.vae.state_dict()),
            (self.text_encoder.config, lora_lib.state_dict_to_save(self.text_encoder)), self.scheduler)
        self.tokenizer.save(folder / "tokenizer")

    # ─── generation (the loop itself: generate.py) ─────────────────────────────────────────────────
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, sampler: str | None = None, karras: bool = False, eta: float = 0.0,
                 seed: int | None = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 num_images_per_prompt: int = 1, callback=None, output_type: str = "pil", clip_skip: int = 0, *,
                 control_image=None, controlnet_scale: float | list[float] | None = None,
                 control_start: float | None = None, control_end: float | None = None, guess_mode: bool | None = None,
                 guidance_rescale: float = 0.0):
        """Text to image. Returns a list of PIL images (output_type "pil"), a tensor (B, 3, H, W) in
        [0, 1] ("pt"), or the final latents before ÷ scaling_factor ("latent").

        guidance_scale 1 turns classifier-free guidance off (one U-Net pass per step); a negative
        prompt replaces the empty prompt of the unconditional branch. `latents`: the initial noise
        (B, 4, h, w) before scaling by the sampler's initial σ. `callback(step, t, latents)` runs after
        every step (given a fourth parameter, it also gets the step's x̂₀, the predicted clean latents).
        Samplers: see `minisd.diffusion.samplers.SAMPLERS` (default: DDIM; `flow_euler` for a flow model).
        guidance_rescale φ in [0, 1] (Lin et al. 2024; 0.7 with a zero-terminal-SNR model) pulls the guided prediction's spread back to
        the conditional one's, against over-exposure at high guidance.

        With a ControlNet loaded (`load_controlnet`): control_image (PIL, list, or tensor in [0, 1]; a list
        of one per ControlNet when several are loaded), controlnet_scale (default 1; one per ControlNet, or
        one for all), control_start/control_end (default 0 and 1: the fraction of the steps it acts on) and
        guess_mode (default False: True steers the conditional branch only). Given none of these, a loaded
        ControlNet sits out. A network's NaN/inf output stops generation: see `nan_check`."""
        control = self._control(control_image, controlnet_scale, control_start, control_end, guess_mode)
        return generate(self, prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, height=height, width=width, sampler=sampler, karras=karras,
                        eta=eta, seed=seed, generator=generator, latents=latents,
                        num_images_per_prompt=num_images_per_prompt, callback=callback, output_type=output_type,
                        clip_skip=clip_skip, control=control, guidance_rescale=guidance_rescale)

    def img2img(self, prompt: str | list[str], image, strength: float = 0.75, *, control_image=None,
                controlnet_scale: float | list[float] | None = None, control_start: float | None = None,
                control_end: float | None = None, guess_mode: bool | None = None, **kwargs):
        """Image to image (SDEdit, Meng et al. 2022): noise the image's latents to the level of step
        (1 − strength)·steps and denoise from there. strength 0 returns the image, 1 ignores it.
        `image`: one picture for every prompt, or a list (or (n, 3, H, W) tensor) of one per prompt.
        The other keyword arguments are those of `__call__`."""
        if image is None:
            raise ValueError("img2img needs an image (a picture, a path, or a tensor in [0, 1]); "
                             "for text to image call pipe(...)")
        control = self._control(control_image, controlnet_scale, control_start, control_end, guess_mode)
        return generate(self, prompt, image=image, strength=strength, control=control, **kwargs)

    def inpaint(self, prompt: str | list[str], image, mask_image, strength: float = 0.75,
                keep_unmasked: bool = True, *, masked_content: str = "fill", mask_blur: float = 2.0,
                control_image=None, controlnet_scale: float | list[float] | None = None,
                control_start: float | None = None, control_end: float | None = None, guess_mode: bool | None = None,
                **kwargs):
        """Repaint where mask_image is white. A 9-channel inpainting U-Net sees the mask and the masked
        image; a standard U-Net gets the known latents pasted back outside the mask after every step.
        `image` and `mask_image` may each be one for every prompt or a list of one per prompt.
        The other keyword arguments are those of `__call__`.

        The defaults are AUTOMATIC1111's way, so that what is not masked stays, whatever the model:
        masked_content="fill" starts the masked area from the colours around it (not from what is
        there, nor from pure noise: strength 0.75, AUTOMATIC1111's default), so it continues the
        picture's background unless the prompt asks otherwise; keep_unmasked=True pastes the original pixels back outside the
        mask after decoding (decoding is not exact, and a 9-channel U-Net may repaint anything),
        across a seam feathered by `mask_blur` px. diffusers' inpainting is strength=1.0,
        keep_unmasked=False, masked_content="original" (`generate.DIFFUSERS_INPAINT`)."""
        if image is None or mask_image is None:
            missing = "image" if image is None else "mask_image"
            raise ValueError(f"inpaint needs an image and a mask_image, got no {missing}")
        control = self._control(control_image, controlnet_scale, control_start, control_end, guess_mode)
        return generate(self, prompt, image=image, mask_image=mask_image, strength=strength,
                        keep_unmasked=keep_unmasked, masked_content=masked_content, mask_blur=mask_blur,
                        control=control, **kwargs)

    # ─── editing a real picture (editing.py) ───────────────────────────────────────────────────────
    def invert(self, image, prompt: str | list[str], num_inference_steps: int = 50, guidance_scale: float = 1.0, *,
               seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """DDIM inversion: the latents z_T (B, 4, h, w) from which `pipe(prompt, latents=z_T, sampler="ddim",
        guidance_scale=1.0, num_inference_steps=n)` redraws `image`. See `editing.invert`."""
        return editing.invert(self, image, prompt, num_inference_steps, guidance_scale, seed, generator)

    def edit(self, image, prompt: str, target_prompt: str, num_inference_steps: int = 50, seed: int | None = 0,
             cross_replace: float = 0.8, self_replace: float = 0.4, guidance_scale: float = 7.5, *,
             generator: torch.Generator | None = None, output_type: str = "pil", null_text: bool = False):
        """Prompt-to-prompt on a real picture ("a red circle" -> "a blue circle"): invert with `prompt`, then
        sample both prompts, the target's attention maps replaced by the source's for the first
        `cross_replace` (cross-attention) and `self_replace` (self-attention) share of the steps. Returns
        the edited picture (a list of one PIL image, or (1, 3, H, W) in [0, 1]). null_text: invert with null-text
        inversion, so that the source is redrawn exactly at this guidance. See `editing.edit`."""
        return editing.edit(self, image, prompt, target_prompt, num_inference_steps, seed, cross_replace,
                            self_replace, guidance_scale, generator, output_type, null_text)

    def _control(self, image, scale, start, end, guess_mode) -> ControlOptions | None:
        """The ControlNet arguments given (None: not given) as one object, defaults filled in; None when
        none was given."""
        given = {k: v for k, v in {"control_image": image, "controlnet_scale": scale, "control_start": start,
                                   "control_end": end, "guess_mode": guess_mode}.items() if v is not None}
        if not given:
            return None
        if not self.controlnets:
            raise ValueError(f"{sorted(given)} need a ControlNet: load one first (pipe.load_controlnet)")
        return ControlOptions(image, 1.0 if scale is None else scale, 0.0 if start is None else start,
                              1.0 if end is None else end, bool(guess_mode))

    # ─── speed and memory switches (fast.py; measured in notebook 13 and docs/benchmarks.md) ──────────
    def enable_vae_slicing(self, enabled: bool = True) -> None:
        self.vae_slicing = enabled

    def enable_vae_tiling(self, enabled: bool = True) -> None:
        self.vae_tiling = enabled

    def enable_attention_slicing(self, slice_size: int | None = 1024) -> None:
        """Attention over `slice_size` queries at a time (U-Net and VAE): the (L, S) attention matrix is
        never whole, for the naive path and for devices without memory-efficient kernels. None: off."""
        fast.set_attention_slice(self.unet, slice_size)
        fast.set_attention_slice(self.vae, slice_size)

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def fuse_qkv_projections(self, fused: bool = True) -> None:
        """q, k, v of every U-Net attention layer in one matmul (k, v for cross-attention): same result,
        fewer kernel launches. A snapshot of the weights: load LoRAs before fusing, or unfuse first."""
        fast.fuse_qkv_projections(self.unet, fused)

    def unfuse_qkv_projections(self) -> None:
        self.fuse_qkv_projections(False)

    def compile(self, mode: str | None = None, vae: bool = True, **kwargs) -> StableDiffusion:
        """torch.compile the U-Net (and the VAE decoder) in place: the first call traces and compiles
        (seconds to minutes), later calls of the same shapes run the fused kernels. mode
        "reduce-overhead" adds CUDA graphs; "max-autotune" also searches matmul/conv kernels."""
        self.unet.compile(mode=mode, dynamic=False, **kwargs)
        self.compile_mode = mode  # CUDA graph modes: generation copies each U-Net output out of the graph's buffer
        if vae:
            self.vae.decoder.compile(mode=mode, dynamic=False, **kwargs)
        return self

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep the components in CPU memory and move each to `device` only while it runs: the GPU
        holds one component at a time (the U-Net's 1.7 GB in fp16 for SD 1.5, not all 2.6 GB)."""
        self.disable_model_cpu_offload()
        self._offload = fast.ModelOffload(self, device)

    def disable_model_cpu_offload(self) -> None:
        if self._offload is not None:
            self._offload.remove()
            self._offload = None

    # ─── ControlNet (controlnet.py) ────────────────────────────────────────────────────────────────
    def load_controlnet(self, source):
        """Add a ControlNet: a diffusers ControlNetModel folder or file, an original lllyasviel
        .pth/.safetensors, a Hub id, or a `ControlNet` object. Every later generation call then takes
        control_image=…, controlnet_scale, control_start/control_end and guess_mode; with several
        ControlNets, control_image (and controlnet_scale) are lists, one entry per ControlNet."""
        cn = source if isinstance(source, ControlNet) else load_controlnet(source, self.unet)
        if cn.config.unet.block_out_channels != self.unet.config.block_out_channels:
            raise ValueError(f"this ControlNet was made for U-Net widths {cn.config.unet.block_out_channels}, "
                             f"not {self.unet.config.block_out_channels}")
        self.controlnets.append(cn.to(device=self.device, dtype=self.dtype))
        if self._offload is not None:  # the new ControlNet joins the U-Net's group
            self.enable_model_cpu_offload(self._offload.device)
        return cn

    def unload_controlnet(self) -> None:
        self.controlnets.clear()

    # ─── video: AnimateDiff's motion module (models/motion.py, formats/motion.py) ──────────────────────
    def load_motion_module(self, source: str | os.PathLike | MotionAdapter,
                           base: MotionAdapterConfig = ANIMATEDIFF_SD15_V2) -> MotionAdapter:
        """Add AnimateDiff's motion module (Guo et al. 2023) for `pipe.video(...)`: a diffusers MotionAdapter folder,
        an original AnimateDiff .ckpt/.safetensors (pickles read with weights_only=True), or a `MotionAdapter`
        (used as it is, not copied). The U-Net is wrapped, not copied, into `pipe.video_unet`; `pipe(...)` still
        draws pictures with the U-Net alone. A second load replaces the first. `base`: the heads and GroupNorm
        groups of a single file, which its weights do not record (8 and 32 in AnimateDiff's SD 1.5 releases).
        A folder `minisd train motion` wrote brings its new words (textual inversions) and LoRA along, and
        `unload_motion_module` takes them away again. Returns the motion adapter."""
        if self.family != "sd1":
            raise ValueError(f"motion modules run on SD 1.x/2.x U-Nets; this is a {self.family} pipeline")
        name = type(source).__name__ if isinstance(source, MotionAdapter) else str(source)
        adapter = source if isinstance(source, MotionAdapter) else \
            motion_files.load_motion_adapter(source, device=self.device, dtype=self.dtype, base=base)
        check_motion_fits(adapter.config, self.unet.config, name)
        self.unload_motion_module()
        self.video_unet = VideoUNet(self.unet, adapter.to(device=self.device, dtype=self.dtype))
        folder = None if isinstance(source, MotionAdapter) else Path(source)
        if folder is not None and folder.is_dir():  # a `minisd train motion` folder: its new words and LoRA too
            words, lora = folder / motion_files.WORDS_FILE, folder / motion_files.LORA_FILE
            if words.is_file():
                self.motion_extras += [self.load_textual_inversion(vector.reshape(1, -1), token=word)
                                       for word, vector in weights.read_state_dict(words).items()]
            if lora.is_file():
                self.motion_extras.append(("lora", self.load_lora(lora, name="motion")))
        return adapter

    def unload_motion_module(self) -> None:
        """Drop the motion module (and the words and LoRA that came with it): the pipeline is again exactly the
        image pipeline (its U-Net was never changed)."""
        for extra in self.motion_extras:
            if isinstance(extra, tuple):
                self.unload_lora(extra[1])
            else:
                self.unload_textual_inversion(extra)
        self.video_unet, self.motion_extras = None, []

    def video(self, prompt: str | list[str], num_frames: int = 8, negative_prompt: str | list[str] | None = None,
              num_inference_steps: int = 50, guidance_scale: float = 7.5, height: int | None = None,
              width: int | None = None, sampler: str | None = None, karras: bool = False, eta: float = 0.0,
              seed: int | None = None, generator: torch.Generator | None = None, latents: Tensor | None = None,
              num_videos_per_prompt: int = 1, callback=None, output_type: str = "pil", clip_skip: int = 0,
              decode_chunk_size: int = 16):
        """Text to video with the loaded motion module (`load_motion_module`), as diffusers' AnimateDiffPipeline:
        the same seed (or generator, or `latents`) gives the same clip. Returns a list of clips, one per video
        (prompts × num_videos_per_prompt), each a list of `num_frames` PIL frames ("pil"); a tensor
        (B, F, 3, H, W) in [0, 1] ("pt"); or the final latents (B, 4, F, h, w) before ÷ scaling_factor ("latent").

        `latents`: the initial noise (B, 4, F, h, w), before scaling by the sampler's initial σ. num_frames: up to
        the motion module's max_seq_length (diffusers' default is 16; 8 keeps the tiny model quick).
        `decode_chunk_size` frames are decoded at a time. The other arguments are those of `__call__`."""
        if self.video_unet is None:
            raise ValueError("no motion module is loaded: pipe.load_motion_module(path) first (a diffusers "
                             "MotionAdapter folder or an AnimateDiff .ckpt/.safetensors)")
        if self._offload is not None:
            raise ValueError("model CPU offload moves the image U-Net alone, not the motion module: "
                             "pipe.disable_model_cpu_offload() before pipe.video(...)")
        return generate_video(self, self.video_unet, prompt, num_frames=num_frames, negative_prompt=negative_prompt,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                              width=width, sampler=sampler, karras=karras, eta=eta, seed=seed, generator=generator,
                              latents=latents, num_videos_per_prompt=num_videos_per_prompt, callback=callback,
                              output_type=output_type, clip_skip=clip_skip, decode_chunk_size=decode_chunk_size)

    # ─── LoRA (lora.py) ────────────────────────────────────────────────────────────────────────────
    @property
    def _lora_roots(self) -> dict:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def load_lora(self, source, scale: float = 1.0, name: str | None = None) -> str:
        """Attach a LoRA (kohya, diffusers/PEFT or older diffusers file, a folder holding
        pytorch_lora_weights.safetensors, or a state dict) at `scale`; several can be attached, each under
        its own name (default: the file's stem). Returns the name."""
        self._refuse_if_qkv_fused("load a LoRA")
        if name is None:
            name = Path(source).stem if not isinstance(source, dict) else f"lora_{len(self.loras)}"
        if name in self.loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded; pass name=… or unload_lora({name!r})")
        scale = lora_lib.check_scale(scale)
        roots = self._lora_roots
        loras = lora_lib.build(roots, lora_lib.read_lora(source, roots))
        for lora in loras.values():
            lora.multiplier = scale
            lora.to(dtype=self.dtype)
        lora_lib.attach(roots, name, loras)
        self.loras[name] = loras
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        if name not in self.loras:
            raise KeyError(f"no LoRA named {name!r}; loaded: {sorted(self.loras)}")
        scale = lora_lib.check_scale(scale)
        fused = any(lo.fused for lo in self.loras[name].values())
        if fused:
            lora_lib.unfuse(self._lora_roots, self.loras[name])
        for lora in self.loras[name].values():
            lora.multiplier = scale
        if fused:
            lora_lib.fuse(self._lora_roots, self.loras[name])

    def _refuse_if_qkv_fused(self, action: str) -> None:
        if any(m.fused for m in fast._attentions(self.unet)):
            raise RuntimeError(f"the U-Net's QKV projections are fused (a snapshot of the weights): "
                               f"pipe.unfuse_qkv_projections() before you {action}, fuse again after")

    def _named_loras(self, name: str | None) -> list[dict]:
        if name is not None and name not in self.loras:
            raise KeyError(f"no LoRA named {name!r}; loaded: {sorted(self.loras)}")
        return list(self.loras.values()) if name is None else [self.loras[name]]

    def fuse_lora(self, name: str | None = None) -> None:
        """Fold every loaded LoRA (or the one named) into the weights (W ← W + scale·ΔW): no extra cost per
        step. `set_lora_scale` on a fused LoRA folds it in again at the new scale."""
        self._refuse_if_qkv_fused("fuse LoRAs")
        for loras in self._named_loras(name):
            lora_lib.fuse(self._lora_roots, loras)

    def unfuse_lora(self, name: str | None = None) -> None:
        """Restore the original weights (of every LoRA, or the one named); the LoRAs stay attached,
        applied on the fly again."""
        self._refuse_if_qkv_fused("unfuse LoRAs")
        for loras in self._named_loras(name):
            lora_lib.unfuse(self._lora_roots, loras)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all): the model is exactly as it was before loading."""
        names = [name] if name is not None else list(self.loras)
        for n in names:
            if n not in self.loras:
                raise KeyError(f"no LoRA named {n!r}; loaded: {sorted(self.loras)}")
            lora_lib.unfuse(self._lora_roots, self.loras[n])
            lora_lib.detach(self._lora_roots, n, self.loras.pop(n))

    # ─── text conditioning ─────────────────────────────────────────────────────────────────────────
    @torch.inference_mode()
    def encode_text(self, prompts: list[str], clip_skip: int = 0) -> Tensor:
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip).to(self.dtype)  # (B, 77, E)

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                      clip_skip: int = 0) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond): the text embeddings (B·n, 77, E) of the prompts and of the negative prompts
        (or of "" when none), repeated `num_images_per_prompt` times. uncond is None when
        guidance_scale <= 1 (no classifier-free guidance, one U-Net pass per step)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a string or a non-empty list of strings")
        cond = self.encode_text(prompts, clip_skip).repeat_interleave(num_images_per_prompt, dim=0)
        if guidance_scale <= 1.0:
            return cond, None
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        uncond = self.encode_text(negatives, clip_skip).repeat_interleave(num_images_per_prompt, dim=0)
        return cond, uncond

    # ─── textual inversion (textual_inversion.py) ──────────────────────────────────────────────────
    def load_textual_inversion(self, source, token: str | None = None) -> str:
        """Teach the text encoder a new word: a diffusers learned_embeds file (or a folder holding one),
        an AUTOMATIC1111 .pt or .safetensors embedding, a state dict, or a tensor (E,) / (n, E) with
        `token`. `token` replaces the file's name for it. A multi-vector embedding is still written
        `<tok>` in prompts. No network weight changes; returns the token."""
        embedding = textual_inversion.read_embedding(source, token)
        if not self.textual_inversions:
            self._own_token_embedding = self.text_encoder.get_input_embeddings()
        textual_inversion.add_embedding(self.tokenizer, self.text_encoder, embedding)
        self.textual_inversions[embedding.token] = embedding
        return embedding.token

    def unload_textual_inversion(self, token: str | None = None) -> None:
        """Remove one textual inversion (by its token) or all. With all gone, the tokenizer and the text
        encoder are exactly as before the first load; the ones kept are loaded again in their order,
        so their ids close up, as in diffusers."""
        if token is not None and token not in self.textual_inversions:
            raise ValueError(f"no textual inversion with token {token!r}; loaded: {list(self.textual_inversions)}")
        if not self.textual_inversions:
            return
        kept = [e for t, e in self.textual_inversions.items() if token is not None and t != token]
        now = self.text_encoder.get_input_embeddings().weight  # where the model is now (after any pipe.to)
        self.text_encoder.set_input_embeddings(self._own_token_embedding.to(device=now.device, dtype=now.dtype))
        self.tokenizer.remove_added_tokens()
        self.textual_inversions.clear()
        for embedding in kept:
            self.load_textual_inversion(embedding.vectors, embedding.token)


def locate(source: str | os.PathLike, variant: str | None = None) -> tuple[Path, str]:
    """(path, name) of a model: "tiny" (the shipped one), a file or folder, or a Hub repo id (downloaded, or
    found in the cache). FileNotFoundError for anything else, before any weight is read."""
    source_str = str(source)
    path = TINY_PATH if source_str == "tiny" else Path(source_str).expanduser()
    if source_str == "tiny" and not path.is_dir():
        raise FileNotFoundError(f"the shipped tiny model is missing from {path}; is this a full clone of minisd?")
    if path.exists():
        return path, "tiny" if source_str == "tiny" else path.name
    if weights.looks_like_repo_id(source_str):
        return weights.download(source_str, variant), source_str
    raise FileNotFoundError(f"{source_str!r} is neither a file, a folder, nor a Hugging Face repo id "
                            f"(owner/name); use 'tiny' for the shipped shapes-world model")


def check_motion_fits(motion: MotionAdapterConfig, unet: UNetConfig, source: str) -> None:
    """A motion module goes after each resnet of a U-Net with its channels per level and resnets per level; one
    error names every difference."""
    if unet.in_channels != unet.out_channels:
        raise ValueError(f"a motion module needs a text-to-image U-Net; this one takes {unet.in_channels} input "
                         f"channels (an inpainting U-Net?)")
    differences = [f"{what} {m} where the U-Net has {u}" for what, m, u in (
        ("channels per level", tuple(motion.block_out_channels), tuple(unet.block_out_channels)),
        ("resnets per level", motion.layers_per_block, unet.layers_per_block)) if m != u]
    if differences:
        raise ValueError(f"the motion module {source} does not fit this U-Net: it has {'; '.join(differences)}")


def family_pipeline(family: str) -> type[StableDiffusion]:
    """The pipeline class of a family (minisd.families): StableDiffusion for SD 1.x/2.x, else the subclass
    whose `family` is its name (pipeline_xl.StableDiffusionXL: the package imports it with this module)."""
    found = [c for c in (StableDiffusion, *StableDiffusion.__subclasses__()) if c.family == family]
    if not found:
        raise ValueError(f"no pipeline class generates with the {family!r} family")
    return found[0]


def save_single_file(pipe: StableDiffusion, path: str | os.PathLike) -> None:
    """The original (LDM) single-file layout as .safetensors, as A1111/ComfyUI read it. minisd's own
    config rides along in the metadata, so non-SD shapes (the tiny model) load back exactly."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_single_file writes .safetensors only, got {path.name!r}")
    sd = weights.to_single_file((pipe.unet.config, lora_lib.state_dict_to_save(pipe.unet)),
                                (pipe.vae.config, pipe.vae.state_dict()), lora_lib.state_dict_to_save(pipe.text_encoder))
    weights.write_safetensors(sd, path, metadata={"format": "pt", "minisd_config": pipe.config.to_json()})

