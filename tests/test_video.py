"""Video (AnimateDiff): `pipe.video` equals diffusers' AnimateDiffPipeline with a MotionAdapter on the same random
weights (SD 1.5's block layout at toy widths, conftest's TEST; fp32 CPU, relative max difference <= 1e-3 as
tests/test_parity_pipeline.py), seeds drawn as diffusers draws them; a fresh motion module draws each frame as the
image pipeline draws it; loading and unloading leave the image pipeline exactly as it was; `minisd video` writes
animations that carry their settings; careless input is refused before any work."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TEST, report
from PIL import Image
from test_motion import original_name

from minisd import StableDiffusion, cli, images
from minisd.diffusion.samplers import SAMPLERS
from minisd.formats.motion import save_motion_adapter
from minisd.formats.weights import write_safetensors
from minisd.models.motion import MotionAdapter, MotionAdapterConfig

diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on the left", "a large blue square at the top"]
# diffusers' UNetMotionModel gives its motion modules the U-Net's GroupNorm groups, whatever the adapter's config
# says (32 for both in SD 1.5): the same here, so that the two networks are one
MOTION = MotionAdapterConfig(block_out_channels=TEST.unet.block_out_channels, num_heads=(2, 2, 2, 2),
                             norm_num_groups=TEST.unet.norm_num_groups)
FRAMES = 4


def reference_adapter(cfg: MotionAdapterConfig, seed: int = 0):
    """diffusers' MotionAdapter, its proj_outs moved away from zero so that every motion module matters."""
    torch.manual_seed(seed)
    adapter = diffusers.MotionAdapter(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                p.add_(0.1 * torch.randn_like(p))
    return adapter.eval()


@pytest.fixture(scope="module")
def motion_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion")
    reference_adapter(MOTION).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(tiny_folder, motion_folder):
    pipe = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    pipe.progress = False
    pipe.load_motion_module(motion_folder)
    return pipe


@pytest.fixture(scope="module")
def ref_pipe(tiny_folder, motion_folder):
    adapter = diffusers.MotionAdapter.from_pretrained(motion_folder)
    pipe = diffusers.AnimateDiffPipeline.from_pretrained(tiny_folder, motion_adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scheduler(name: str, folder):
    return getattr(diffusers, SAMPLERS[name].diffusers_class).from_pretrained(folder, subfolder="scheduler")


# ─── parity with diffusers ─────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("euler", 0.0), ("euler_a", 0.0)])
def test_video_matches_diffusers(sampler, eta, ours, ref_pipe, tiny_folder):
    """Two prompts, negative prompts, CFG 7.5, the noise drawn by both from the same seed (and, for DDIM with
    eta > 0 and Euler ancestral, each step's noise too): the same latents (B, C, F, h, w) and frames."""
    ref_pipe.scheduler = scheduler(sampler, tiny_folder)
    common = dict(num_frames=FRAMES, num_inference_steps=3, guidance_scale=7.5, eta=eta,
                  negative_prompt=["green", "black background"])
    expected = ref_pipe(PROMPTS, generator=torch.Generator().manual_seed(5), output_type="latent", **common).frames
    mine = ours.video(PROMPTS, sampler=sampler, generator=torch.Generator().manual_seed(5), output_type="latent",
                      **common)
    assert mine.shape == expected.shape == (2, 4, FRAMES, 8, 8)
    report(f"video {sampler} (eta {eta}) latents", mine, expected, 1e-3)
    expected = ref_pipe(PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt", **common).frames
    mine = ours.video(PROMPTS, sampler=sampler, seed=5, output_type="pt", **common)
    assert mine.shape == expected.shape == (2, FRAMES, 3, 64, 64)
    report(f"video {sampler} (eta {eta}) frames", mine, expected, 1e-3)


def test_pil_frames_and_given_latents_match_diffusers(ours, ref_pipe, tiny_folder):
    """Given latents, no guidance: a list of F PIL frames per video, the same pictures as diffusers'."""
    ref_pipe.scheduler = scheduler("ddim", tiny_folder)
    latents = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = ref_pipe(PROMPTS[0], num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0, latents=latents,
                        output_type="pil").frames
    mine = ours.video(PROMPTS[0], num_frames=FRAMES, num_inference_steps=2, guidance_scale=1.0, latents=latents)
    assert len(mine) == 1 and len(mine[0]) == FRAMES and mine[0][0].size == (64, 64)
    as_tensor = lambda clip: torch.stack([images.pil_to_tensor(f) for f in clip])  # noqa: E731
    report("video PIL frames, guidance 1", as_tensor(mine[0]), as_tensor(expected[0]), 1 / 255 + 1e-6)


def test_original_animatediff_files_load(ours, motion_folder, tmp_path):
    """AnimateDiff's own layout, as .safetensors and as a pickled .ckpt (read with weights_only=True): the same
    motion module, so the same clip."""
    expected = ours.video(PROMPTS[0], num_frames=FRAMES, num_inference_steps=2, seed=3, output_type="latent")
    sd = {o: v.clone() for k, v in diffusers.MotionAdapter.from_pretrained(motion_folder).state_dict().items()
          for o in original_name(k)}
    write_safetensors(sd, tmp_path / "mm.safetensors")
    torch.save(sd, tmp_path / "mm.ckpt")
    try:
        for name in ("mm.safetensors", "mm.ckpt"):
            ours.load_motion_module(tmp_path / name, base=MOTION)  # the heads are not in the weights
            again = ours.video(PROMPTS[0], num_frames=FRAMES, num_inference_steps=2, seed=3, output_type="latent")
            assert torch.equal(again, expected), name
    finally:
        ours.load_motion_module(motion_folder)


# ─── what a motion module changes, and what it leaves ─────────────────────────────────────────────

def test_fresh_motion_module_draws_each_frame_as_the_image_pipeline(tiny_pipe):
    """proj_out starts at zero: every motion module is the identity, so frame f of the clip is the picture the image
    pipeline draws from frame f's latents (up to rounding: the time MLP runs on one row per video, not per frame)."""
    pipe = tiny_pipe
    pipe.progress = False
    latents = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(2))
    pipe.load_motion_module(MotionAdapter(MOTION))
    try:
        clip = pipe.video(PROMPTS[0], num_frames=FRAMES, num_inference_steps=3, latents=latents, output_type="pt")
    finally:
        pipe.unload_motion_module()
    pictures = pipe([PROMPTS[0]] * FRAMES, num_inference_steps=3, latents=latents[0].transpose(0, 1),
                    output_type="pt")  # (F, 3, H, W) from the F frames' latents (F, 4, h, w)
    report("fresh motion module vs the image pipeline, frame by frame", clip[0], pictures, 1e-5)


def test_load_unload_restores_the_image_pipeline_exactly(tiny_pipe, motion_folder):
    pipe = tiny_pipe
    pipe.progress = False
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    modules = [name for name, _ in pipe.unet.named_modules()]
    picture = pipe(PROMPTS[0], num_inference_steps=2, seed=0, output_type="pt")
    pipe.load_motion_module(motion_folder)
    assert pipe.video_unet.unet is pipe.unet  # wrapped, not copied
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(pipe.video_unet.unet.parameters(), pipe.unet.parameters()))
    first = pipe.video(PROMPTS[0], num_frames=FRAMES, num_inference_steps=2, seed=0, output_type="latent")
    assert torch.equal(pipe(PROMPTS[0], num_inference_steps=2, seed=0, output_type="pt"), picture)  # pictures as before
    fresh = pipe.load_motion_module(MotionAdapter(MOTION))  # a second load replaces the first
    assert pipe.video_unet.adapter is fresh
    replaced = pipe.video(PROMPTS[0], num_frames=FRAMES, num_inference_steps=2, seed=0, output_type="latent")
    assert (replaced - first).abs().max() > 1e-3
    pipe.unload_motion_module()
    assert pipe.video_unet is None
    assert [name for name, _ in pipe.unet.named_modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(pipe(PROMPTS[0], num_inference_steps=2, seed=0, output_type="pt"), picture)
    with pytest.raises(ValueError, match="no motion module is loaded"):
        pipe.video(PROMPTS[0])


def test_same_seed_same_clip_and_per_video_outputs(ours):
    a = ours.video(PROMPTS, num_frames=FRAMES, num_inference_steps=2, seed=9, output_type="pt")
    b = ours.video(PROMPTS, num_frames=FRAMES, num_inference_steps=2, seed=9, output_type="pt")
    assert torch.equal(a, b)
    two = ours.video(PROMPTS[0], num_frames=FRAMES, num_inference_steps=2, seed=9, num_videos_per_prompt=2)
    assert len(two) == 2 and all(len(clip) == FRAMES for clip in two)
    # the frames of a clip differ (its noise is drawn per frame), and the motion modules mix them
    assert (a[0, 0] - a[0, 1]).abs().max() > 1e-3


BAD_CALLS = [
    (dict(num_frames=0), "num_frames must be a whole number from 1 to 32"),
    (dict(num_frames=33), "from 1 to 32"),
    (dict(num_frames=True), "num_frames"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(height=60), "multiples of 8"),
    (dict(sampler="nope"), "unknown sampler"),
    (dict(output_type="np"), "output_type"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(seed=-1), "seed"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents must have shape \(1, 4, 4, 8, 8\)"),
    (dict(decode_chunk_size=0), "decode_chunk_size"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CALLS, ids=[next(iter(k)) + str(i) for i, (k, _) in enumerate(BAD_CALLS)])
def test_bad_calls_fail_before_any_work(kwargs, message, ours):
    kwargs = {"num_frames": FRAMES, **kwargs}
    with pytest.raises(ValueError, match=message):
        ours.video(PROMPTS[0], num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


def test_motion_modules_that_do_not_fit_are_refused(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match=r"does not fit this U-Net: it has channels per level \(32, 64\) where the "
                                         r"U-Net has \(32, 64, 64, 64\)"):
        tiny_pipe.load_motion_module(MotionAdapter(MotionAdapterConfig(block_out_channels=(32, 64), num_heads=(2, 2))))
    wide = replace(MOTION, layers_per_block=3)
    save_motion_adapter(MotionAdapter(wide), tmp_path / "three")
    with pytest.raises(ValueError, match=r"three does not fit this U-Net: it has resnets per level 3 where the U-Net has 2"):
        tiny_pipe.load_motion_module(tmp_path / "three")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        tiny_pipe.load_motion_module(tmp_path / "missing")
    assert tiny_pipe.video_unet is None


# ─── minisd video ──────────────────────────────────────────────────────────────────────────────────

FAST = ["--frames", "3", "--steps", "2", "--size", "16", "--quiet"]


def run(argv: list) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def tiny_motion(tmp_path_factory):
    """A motion module for the shipped tiny model's U-Net, its proj_outs away from zero."""
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    u = pipe.unet.config
    cfg = MotionAdapterConfig(block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block,
                              num_heads=(2,) * len(u.block_out_channels), norm_num_groups=16, max_seq_length=8)
    torch.manual_seed(0)
    adapter = MotionAdapter(cfg)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny_motion")
    save_motion_adapter(adapter, folder)
    return folder


def recorded(path: Path) -> dict[str, str]:
    """The settings an animation carries: the GIF comment, or the WebP's EXIF UserComment."""
    with Image.open(path) as im:
        text = im.info.get("comment")
        if text is None:
            comment = im.getexif().get_ifd(cli.EXIF_IFD)[cli.USER_COMMENT]
            text = comment[len(cli.UNICODE_PREFIX):].decode("utf-16-be")
    prompt, negative, fields = cli.parse_parameters(text.decode() if isinstance(text, bytes) else text)
    return {"prompt": prompt, "negative": negative, **fields}


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_minisd_video_writes_an_animation_with_its_settings(suffix, tiny_motion, tmp_path):
    out = tmp_path / f"clip{suffix}"
    assert run(["video", "a red circle moving to the right", "--motion", tiny_motion, "--out", out, "--seed", "4",
                "--negative", "a blue square", "--guidance", "5", "--fps", "4", *FAST]) == 0
    with Image.open(out) as im:
        assert im.n_frames == 3 and im.size == (16, 16) and getattr(im, "is_animated", False)
        assert im.info.get("duration") in (250, None)  # 4 fps (PIL reads no duration back from WebP)
    settings = recorded(out)
    assert settings["prompt"] == "a red circle moving to the right" and settings["negative"] == "a blue square"
    assert {k: settings[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Frames", "FPS",
                                     "Motion module")} == \
        {"Steps": "2", "Sampler": "DDIM", "CFG scale": "5", "Seed": "4", "Size": "16x16", "Model": "tiny",
         "Frames": "3", "FPS": "4", "Motion module": tiny_motion.name}
    again = tmp_path / f"again{suffix}"  # the recorded settings make the same file, byte for byte
    assert run(["video", "a red circle moving to the right", "--motion", tiny_motion, "--out", again, "--seed", "4",
                "--negative", "a blue square", "--cfg", "5", "--fps", "4", *FAST]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_minisd_help_lists_video():
    result = subprocess.run([sys.executable, "-m", "minisd", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "video" in result.stdout and "text to video" in result.stdout


CARELESS = [
    (["--frames", "0"], "--frames"),
    (["--frames", "x"], "expected a whole number"),
    (["--fps", "0"], "--fps"),
    (["--steps", "0"], "--steps"),
    (["--out", "clip.avi"], "expected a name ending in .gif, .webp, .mp4"),
    (["--out", "clip"], "expected a name ending in"),
    (["--out", "DIR"], "is a folder"),
    (["--out", "FILE/clip.gif"], "is a file, not a folder"),
    (["--motion", "/no/motion"], "--motion not found"),
    (["--model", "/no/model"], "neither a file"),
    (["--sampler", "nope"], "known samplers"),
    (["--size", "60"], "multiples of 8"),
    (["--seed", "-2"], "--seed"),
    (["--frames", "9"], "from 1 to 8"),  # past the motion module's positions: refused before sampling
    (["--model", "MODEL"], "does not fit this U-Net"),  # a model of other widths
]


@pytest.mark.parametrize("argv,message", CARELESS, ids=[" ".join(a) for a, _ in CARELESS])
def test_careless_input_is_one_line_and_exit_2(argv, message, tiny_motion, tiny_folder, tmp_path, monkeypatch,
                                               capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    (tmp_path / "FILE").write_text("not a folder")
    argv = [str(tiny_folder) if a == "MODEL" else a for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert run(["video", "x", "--motion", tiny_motion, *FAST[:-1], *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_mp4_needs_imageio_ffmpeg_and_no_motion_module_is_named(tiny_motion, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "mp4_available", lambda: False)
    assert run(["video", "x", "--motion", tiny_motion, "--out", tmp_path / "clip.mp4", *FAST]) == 2
    assert "writing .mp4 needs imageio-ffmpeg" in capsys.readouterr().err
    monkeypatch.setattr(cli, "TINY_MOTION", tmp_path / "tiny_motion")  # without --motion, and no shipped module
    assert run(["video", "x", "--out", tmp_path / "clip.gif", *FAST]) == 2
    assert "no motion module: give --motion PATH" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_without_motion_the_shipped_module_draws(tmp_path):
    """`minisd video PROMPT`: the tiny model with its own motion module, data/tiny_motion (which reads the caption)."""
    assert cli.TINY_MOTION.is_dir()
    out = tmp_path / "clip.gif"
    assert run(["video", "a red circle moving to the right", "--out", out, "--seed", "1", *FAST]) == 0
    assert recorded(out)["Motion module"] == "tiny_motion"
