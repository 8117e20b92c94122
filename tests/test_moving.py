"""Moving shapes (moving.py), the video evaluator (video_eval.py) and the motion module's training
(train_motion.py): the data's grammar and motion, the evaluator right on ground truth, training that runs,
resumes, starts as the image model and refuses careless configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minisd.formats.weights import read_state_dict
from minisd.shapes import moving, video_eval
from minisd.shapes.train_motion import (INIT_WORDS, LORA_FILE, WORDS_FILE, MotionConfig, build, load_frozen,
                                        load_motion, sample_clips, save_motion, train_motion)
from minisd.shapes.world import BACKGROUNDS, BASE_SHAPES, COLOURS, SIZE, SIZES


def ground_truth(clips: list[moving.Clip]) -> torch.Tensor:
    """(B, F, 3, 64, 64) in [0, 1]: the clips as rendered."""
    return torch.stack([(moving.clip_tensor(c) + 1) / 2 for c in clips])


# ─── the data ──────────────────────────────────────────────────────────────────────────────────────

def test_captions_follow_the_grammar_and_name_the_clip():
    clips = [moving.make_clip(s) for s in range(300)]
    for clip in clips:
        asked = video_eval.parse_caption(clip.caption)  # the grammar, or a ValueError
        assert (asked.colour, asked.shape, asked.direction) == (clip.colour, clip.shape, clip.direction)
        assert asked.size in (None, clip.size) and asked.background in (None, clip.background)
        assert clip.colour in COLOURS and clip.shape in BASE_SHAPES and clip.size in SIZES
        assert clip.background in BACKGROUNDS and "star" not in clip.caption
    assert {c.direction for c in clips} == set(moving.DIRECTIONS)
    assert {c.shape for c in clips} == set(BASE_SHAPES)  # never the held-out star
    for phrase in ("moving to the left", "moving to the right", "moving up", "moving down", " background", "small",
                   "large", "an orange"):
        assert any(phrase in c.caption for c in clips), phrase
    with pytest.raises(ValueError, match="moving-shapes grammar"):
        video_eval.parse_caption("a red circle on the left")


def test_motion_is_straight_steady_visible_and_inside_the_frame():
    for seed in range(200):
        clip = moving.make_clip(seed)
        c = np.array(clip.centers)  # (F, 2)
        step = np.diff(c, axis=0)
        dx, dy = moving.DIRECTIONS[clip.direction]
        travel = (c[-1] - c[0]) @ np.array([dx, dy])
        assert len(c) == moving.FRAMES and travel >= 25, (seed, travel)  # a visible motion the right way
        assert np.allclose(step, step[0]) and np.allclose(step @ np.array([dy, dx]), 0)  # straight and steady
        half = SIZES[clip.size] / 2
        assert (c - half >= 0).all() and (c + half <= SIZE).all()  # the whole shape in every frame
        # it starts near the side it moves away from
        start = c[0] @ np.array([dx, dy]) if dx + dy > 0 else SIZE - c[0] @ np.array([-dx, -dy])
        assert start <= SIZE / 2 - 4, (seed, start)
    speeds = {round(float(np.linalg.norm(np.diff(moving.make_clip(s).centers, axis=0)[0])), 1) for s in range(50)}
    assert len(speeds) > 10  # the speed varies


def test_clips_are_deterministic_and_the_split_holds():
    assert moving.make_clip(7).caption == moving.make_clip(7).caption
    assert torch.equal(moving.clip_tensor(moving.make_clip(7)), moving.clip_tensor(moving.make_clip(7)))
    frames = moving.clip_tensor(moving.make_clip(7))
    assert frames.shape == (8, 3, 64, 64) and -1 <= frames.min() and frames.max() <= 1
    assert not torch.equal(frames[0], frames[-1])
    assert not any(moving.held_out(c.colour, c.shape, c.direction) for c in map(moving.training_clip, range(300)))
    ev = moving.eval_clips(32)
    assert [sum(c.direction == d for c in ev) for d in moving.DIRECTIONS] == [8, 8, 8, 8]
    assert sum(moving.held_out(c.colour, c.shape, c.direction) for c in ev) == 16
    assert [c.caption for c in ev] == [c.caption for c in moving.eval_clips(32)]


# ─── the evaluator ─────────────────────────────────────────────────────────────────────────────────

def test_evaluator_is_right_on_ground_truth_clips():
    clips = moving.eval_clips(24) + [moving.training_clip(i) for i in range(24)]
    records = video_eval.judge_clips(ground_truth(clips), [c.caption for c in clips])
    summary = video_eval.summarise(records)
    print(video_eval.format_summary(summary))
    for name in ("direction", "identity", "colour", "shape", "both"):
        assert summary[name]["share"] == 1.0, (name, [r for r in records if not r["direction_ok"]][:2])
    assert summary["direction"]["n"] == 48 and 0.9 < summary["direction"]["low"] < 1.0


def test_evaluator_catches_wrong_direction_lost_identity_and_no_motion():
    clip = moving.make_clip(3)
    frames = ground_truth([clip])
    reverse = video_eval.judge_clips(frames.flip(1), [clip.caption])[0]
    assert not reverse["direction_ok"] and reverse["identity_ok"]
    still = video_eval.judge_clips(frames[:, :1].expand(-1, 8, -1, -1, -1), [clip.caption])[0]
    assert still["seen"] == "none" and not still["direction_ok"]
    other = next(c for c in COLOURS if c != clip.colour)
    wrong = video_eval.judge_clips(frames, [clip.caption.replace(clip.colour, other, 1)])[0]
    assert wrong["colour_frames"] == 0 and not wrong["identity_ok"]
    two_swapped = frames.clone()
    two_swapped[0, 2:4] = ground_truth([moving.Clip(clip.background, other, clip.shape, clip.size, clip.direction,
                                                    clip.centers)])[0, 2:4]
    assert video_eval.judge_clips(two_swapped, [clip.caption])[0]["kept_frames"] == 6  # 6 of 8: identity lost
    assert not video_eval.judge_clips(two_swapped, [clip.caption])[0]["identity_ok"]
    with pytest.raises(ValueError, match="expected \\(B, F, 3, H, W\\)"):
        video_eval.judge_clips(frames[0], [clip.caption])


# ─── training ──────────────────────────────────────────────────────────────────────────────────────

SMALL = dict(n_clips=4, batch=2, warmup=1, heads=2, bf16="no", checkpoint_minutes=60.0)


def test_training_runs_saves_and_resumes(tmp_path):
    cfg = MotionConfig(steps=2, out=str(tmp_path / "model"), work=str(tmp_path), **SMALL)
    out = train_motion(cfg)
    assert {"config.json", "diffusion_pytorch_model.safetensors", WORDS_FILE, "training.json"} <= \
        {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "MotionAdapter" and config["block_out_channels"] == [64, 128, 128]
    words = read_state_dict(out / WORDS_FILE)
    assert sorted(words) == sorted(INIT_WORDS) and all(v.shape == (128,) for v in words.values())
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["steps"] == 2 and record["minutes"]["seconds_per_step"] > 0 and "machine" in record
    assert torch.load(tmp_path / "motion.pt", weights_only=True)["step"] == 2

    with pytest.raises(ValueError, match="--force"):  # a saved module is never replaced by accident
        train_motion(cfg)
    more = MotionConfig(steps=3, out=str(tmp_path / "model"), work=str(tmp_path), **SMALL)
    train_motion(more, force=True)
    assert "motion: resumed at step 2" in (tmp_path / "log.txt").read_text()
    ck = torch.load(tmp_path / "motion.pt", weights_only=True)
    assert ck["step"] == 3 and len(ck["losses"]) == 3  # the loss curve whole across the resume


def test_saved_module_loads_and_samples(tmp_path):
    pipe = load_frozen("tiny", "cpu")
    video, ids, loras = build(MotionConfig(lora_rank=2, **SMALL), pipe)
    torch.nn.init.normal_(video.adapter.down_blocks[0].motion_modules[0].proj_out.weight)  # not the identity
    words = {w: pipe.text_encoder.get_input_embeddings().weight[i] + 0.5 for w, i in zip(INIT_WORDS, ids)}
    save_motion(tmp_path, video.adapter, words, loras)
    assert {"config.json", "diffusion_pytorch_model.safetensors", WORDS_FILE, LORA_FILE} <= \
        {p.name for p in tmp_path.iterdir()}

    pipe = load_frozen("tiny", "cpu")  # the saved module at work: frames in [0, 1], the same for the same seed
    loaded = load_motion(pipe, tmp_path)
    for k, v in video.adapter.state_dict().items():
        assert torch.equal(loaded.adapter.state_dict()[k], v), k
    rows = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.hf.convert_tokens_to_ids(list(words))]
    assert torch.equal(rows, torch.stack(list(words.values())))
    assert "motion" in pipe.loras
    a = sample_clips(pipe, loaded, ["a red circle moving up"], steps=2, seed=1)
    b = sample_clips(pipe, video, ["a red circle moving up"], steps=2, seed=1)
    assert a.shape == (1, 8, 3, 64, 64) and 0 <= a.min() and a.max() <= 1 and torch.equal(a, b)


def test_fresh_module_changes_nothing():
    pipe = load_frozen("tiny", "cpu")
    captions = ["a red circle on the left", "a small blue square at the top"]
    before = pipe.text_encoder(pipe.tokenizer(captions))
    video, ids, loras = build(MotionConfig(lora_rank=2, **{k: v for k, v in SMALL.items() if k != "heads"}), pipe)
    assert len(ids) == 3 and len(loras) > 0
    context = pipe.text_encoder(pipe.tokenizer(captions))
    assert torch.equal(context, before)  # the new words change no other caption
    z = torch.randn(2, 4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ours = video(z, t, context)
        image = torch.stack([pipe.unet(z[:, :, f], t, context) for f in range(8)], dim=2)
    diff = (ours - image).abs()
    print(f"fresh motion module + LoRA vs the image U-Net: max abs diff {diff.max():.3e}, mean {diff.mean():.3e}")
    assert diff.max() < 1e-5


def test_bad_config_refused():
    with pytest.raises(ValueError, match="--words"):
        MotionConfig(words="moving,left")
    with pytest.raises(ValueError, match="--batch"):
        MotionConfig(batch=0)
    with pytest.raises(ValueError, match="--max-frames"):
        MotionConfig(max_frames=4)
    with pytest.raises(ValueError, match="--lr"):
        MotionConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="heads 3"):  # 3 heads cannot share 64 channels
        MotionConfig(heads=3).adapter_config(load_frozen("tiny", "cpu").unet.config)


def test_cli_dispatches_train_motion(capsys):
    from minisd import cli

    assert cli.main(["train", "motion", "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "motion", "--help"])
    assert "--lora-rank" in capsys.readouterr().out


def test_timesteps_favour_the_noisier_half():
    from minisd.shapes.train_motion import timesteps

    g = torch.Generator().manual_seed(0)
    t = timesteps(1000, 20_000, 0.5, g)
    assert 0 <= t.min() and t.max() < 1000
    assert abs((t >= 500).float().mean().item() - 0.75) < 0.02  # half drawn there, and half of the rest
    assert abs((timesteps(1000, 20_000, 0.0, g) >= 500).float().mean().item() - 0.5) < 0.02


def test_direction_gap_turns_the_direction_round():
    pipe = load_frozen("tiny", "cpu")
    video, _, _ = build(MotionConfig(**SMALL), pipe)
    clips = moving.eval_clips(8)
    gap = video_eval.direction_gap(pipe, video, clips, timesteps=(500,))
    assert set(gap) == {500} and gap[500]["loss"] > 0 and abs(gap[500]["gap"]) < 0.5
    assert gap[500]["swapped"] != gap[500]["loss"]  # the frozen image model reads left/right as places


def test_minisd_eval_video_scores_a_saved_module(tmp_path, capsys):
    """`minisd eval --video FOLDER`: the held-out clips judged, the summaries printed and written; a missing
    folder refused in one line before anything is loaded."""
    from minisd import cli

    pipe = load_frozen("tiny", "cpu")
    video, ids, _ = build(MotionConfig(**SMALL), pipe)
    words = {w: pipe.text_encoder.get_input_embeddings().weight[i] for w, i in zip(INIT_WORDS, ids)}
    save_motion(tmp_path / "motion", video.adapter, words, {})
    out = tmp_path / "video.json"
    assert cli.main(["eval", "--video", str(tmp_path / "motion"), "--limit", "2", "--steps", "2",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["direction"]["n"] == 2 and "summary:" in capsys.readouterr().out
    assert cli.main(["eval", "--video", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--video" in err


def test_pipe_load_motion_module_brings_the_words_and_lora_and_unload_takes_them_away(tmp_path):
    pipe = load_frozen("tiny", "cpu")
    video, ids, loras = build(MotionConfig(lora_rank=2, **SMALL), pipe)
    words = {w: pipe.text_encoder.get_input_embeddings().weight[i] + 0.5 for w, i in zip(INIT_WORDS, ids)}
    save_motion(tmp_path, video.adapter, words, loras)

    pipe = load_frozen("tiny", "cpu")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    vocab = len(pipe.tokenizer)
    pipe.load_motion_module(tmp_path)
    assert set(words) <= set(pipe.textual_inversions) and "motion" in pipe.loras
    assert len(pipe.tokenizer) == vocab + len(words)
    clip = pipe.video("a red circle moving up", num_frames=4, num_inference_steps=2, seed=0, output_type="pt")
    assert clip.shape == (1, 4, 3, 64, 64)
    pipe.load_motion_module(tmp_path)  # a second load replaces the first: no word or LoRA twice
    assert len(pipe.tokenizer) == vocab + len(words)
    pipe.unload_motion_module()
    assert pipe.video_unet is None and not pipe.textual_inversions and "motion" not in pipe.loras
    assert len(pipe.tokenizer) == vocab
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


# ─── the motion module that reads the caption ──────────────────────────────────────────────────────

def test_text_reading_block_is_per_pixel_cross_attention_and_reads_the_caption():
    from minisd.models.motion import TemporalTransformerBlock

    torch.manual_seed(0)
    block = TemporalTransformerBlock(16, 2, 32, text_dim=12).eval()
    B, L, F, T = 2, 5, 8, 7
    x, text = torch.randn(B * L, F, 16), torch.randn(B, T, 12)
    where = torch.randn(L, 1, 16)  # the pixels' places
    with torch.no_grad():
        ours = block(x, text, where)
        # by hand: every pixel's frames, their frame positions and the pixel's place added, attend to their own
        # video's caption
        h = x + block.attn1(block.pos_embed(block.norm1(x)))
        q = block.pos_embed(block.norm2(h)) + where.repeat(B, 1, 1)
        h = h + block.attn2(q, text.repeat_interleave(L, dim=0))  # (B·L, F, C) against (B·L, T, E)
        by_hand = h + block.ff(block.norm3(h))
        other = block(x, torch.randn(B, T, 12), where)
    diff = (ours - by_hand).abs()
    print(f"text-reading temporal block vs per-pixel cross-attention by hand: max abs diff {diff.max():.3e}")
    assert diff.max() < 1e-5
    assert (other - ours).abs().max() > 1e-2  # another caption, another output
    with pytest.raises(ValueError, match="context"):
        block(x)


def test_image_positions_tell_pixels_apart_and_levels_agree():
    from minisd.models.motion import image_positions

    fine, coarse = image_positions(16, 16, 32), image_positions(8, 8, 32)
    assert fine.shape == (256, 1, 32) and coarse.shape == (64, 1, 32)
    assert torch.cdist(fine[:, 0], fine[:, 0]).add(torch.eye(256)).min() > 0.1  # every pixel its own place
    # the place of a coarse pixel is that of the same spot of the picture: between the four fine pixels it covers
    fine_grid, coarse_grid = fine.reshape(16, 16, 32), coarse.reshape(8, 8, 32)
    mean_of_four = fine_grid.reshape(8, 2, 8, 2, 32).mean((1, 3))
    nearest = torch.cdist(coarse_grid.reshape(64, 32), mean_of_four.reshape(64, 32)).argmin(1)
    assert torch.equal(nearest, torch.arange(64))


def test_text_reading_module_round_trips_and_plain_one_stays_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import MotionAdapter as DiffusersMotionAdapter

    from minisd.formats.motion import load_motion_adapter, save_motion_adapter
    from minisd.models.motion import TEXT_KEY

    pipe = load_frozen("tiny", "cpu")
    for reads_text in ("yes", "no"):
        motion = MotionConfig(reads_text=reads_text, words="", **SMALL)
        video, _, _ = build(motion, pipe)
        cfg = motion.adapter_config(pipe.unet.config)
        save_motion_adapter(video.adapter, tmp_path / reads_text)
        assert load_motion_adapter(tmp_path / reads_text).config == cfg
        config = json.loads((tmp_path / reads_text / "config.json").read_text())
        assert config.get(TEXT_KEY) == (128 if reads_text == "yes" else None)
    DiffusersMotionAdapter.from_pretrained(tmp_path / "no")  # AnimateDiff's design: diffusers reads it
    with pytest.raises(Exception, match="size mismatch|shape"):  # its attn2 reads 128-wide text, not 64 channels
        DiffusersMotionAdapter.from_pretrained(tmp_path / "yes")


def test_docs_quote_the_shipped_modules_evaluation():
    """docs/shapes_world.md's table of data/tiny_motion is the two evaluation files, and they meet the goals."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "shapes_world.md").read_text()
    draws = [json.loads((root / "docs" / "results" / name).read_text())["summary"]
             for name in ("motion.json", "motion_draw2.json")]
    for label, summary in zip(("seeds 0–31", "seeds 1000–1031"), draws):
        cells = [f"{s['successes']} / {s['n']} ({100 * s['share']:.0f}%, {100 * s['low']:.0f}–{100 * s['high']:.0f}%)"
                 for s in (summary["direction"], summary["identity"], summary["both"])]
        assert f"| {label} | " + " | ".join(cells) + " |" in docs
    k = {name: sum(d[name]["successes"] for d in draws) for name in ("direction", "identity")}
    assert k["direction"] / 64 >= 0.80 and k["identity"] / 64 >= 0.85  # the goals, over both draws
    assert f"| {k['direction']} / 64 ({100 * k['direction'] / 64:.0f}%) | {k['identity']} / 64" in docs
