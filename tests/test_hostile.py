"""Hostile and careless input at the loading boundary: configs, weight files, shard indexes, pictures,
interrupted writes. Each case names the exact exception type and a fragment of its one-line message;
almost all fail before any real work (no module is built, no tensor data is read)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from minisd import StableDiffusion, WeightsError
from minisd.formats import weights
from minisd.formats.files import atomic_write, atomic_write_text
from minisd.images import image_to_tensor, mask_to_tensor
from minisd.models.tokenizer import Tokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny"
CONFIGS = {"unet": "unet/config.json", "vae": "vae/config.json", "text": "text_encoder/config.json",
           "sched": "scheduler/scheduler_config.json", "index": "model_index.json"}
WEIGHTS = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
           "text": "text_encoder/model.safetensors"}


def tiny_copy(tmp: Path) -> Path:
    """data/tiny with its configs copied and its weights and tokenizer linked: cheap to corrupt."""
    out = tmp / "tiny"
    for rel in CONFIGS.values():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TINY / rel, out / rel)
    for rel in WEIGHTS.values():
        (out / rel).symlink_to(TINY / rel)
    (out / "tokenizer").symlink_to(TINY / "tokenizer")
    return out


def edit_json(folder: Path, which: str, **changes) -> None:
    path = folder / CONFIGS[which]
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


DELETE = object()

# ─── configs: each bad field, one line naming the file, the field and the allowed range ─────────────

CONFIG_CASES = [
    ("unet", "layers_per_block", 1000000, "layers_per_block = 1000000; expected an integer in 1..8"),
    ("unet", "layers_per_block", 0, "layers_per_block = 0"),
    ("unet", "layers_per_block", -1, "layers_per_block = -1"),
    ("unet", "layers_per_block", "2", "layers_per_block = '2'"),
    ("unet", "layers_per_block", 1.5, "layers_per_block = 1.5"),
    ("unet", "layers_per_block", True, "layers_per_block = True"),
    ("unet", "layers_per_block", None, "layers_per_block = None"),
    ("unet", "layers_per_block", [1, 1, 1], "per-level layers_per_block"),
    ("unet", "in_channels", 0, "in_channels = 0; expected an integer in 1..64"),
    ("unet", "in_channels", 100000, "in_channels = 100000"),
    ("unet", "out_channels", -4, "out_channels = -4"),
    ("unet", "block_out_channels", [0, 128, 128], "block_out_channels = 0; expected an integer in 1..8192"),
    ("unet", "block_out_channels", [64, 128, 1 << 20], "block_out_channels = 1048576"),
    ("unet", "block_out_channels", [64, 128, 130], "channels 130 must divide by heads 4 and groups 16"),
    ("unet", "block_out_channels", 64, "block_out_channels = 64; expected a list"),
    ("unet", "block_out_channels", [], "block_out_channels = (); expected a list of 1..8 entries"),
    ("unet", "block_out_channels", [64, 128], "cross_attention = (True, True, False); expected a list of 2"),
    ("unet", "norm_num_groups", 0, "norm_num_groups = 0"),
    ("unet", "norm_num_groups", 7, "must divide by heads 4 and groups 7"),
    ("unet", "attention_head_dim", 3, "must divide by heads 3"),
    ("unet", "attention_head_dim", 0, "num_heads = 0"),
    ("unet", "attention_head_dim", [4, 4], "num_heads = (4, 4); expected a list of 3"),
    ("unet", "attention_head_dim", "four", "num_heads = 'four'"),
    ("unet", "cross_attention_dim", 0, "cross_attention_dim = 0"),
    ("unet", "cross_attention_dim", [128, 128, 128], "per-level cross_attention_dim"),
    ("unet", "norm_eps", 0, "norm_eps = 0; expected a finite number in (0, 1]"),
    ("unet", "norm_eps", -1e-5, "norm_eps = -1e-05"),
    ("unet", "sample_size", 0, "sample_size = 0; expected an integer in 1..1024"),
    ("unet", "sample_size", 1 << 30, "sample_size = 1073741824"),
    ("unet", "use_linear_projection", "yes", "use_linear_projection = 'yes'; expected true or false"),
    ("unet", "flip_sin_to_cos", 1, "flip_sin_to_cos = 1"),
    ("unet", "down_block_types", "CrossAttnDownBlock2D", "down_block_types = 'CrossAttnDownBlock2D'; expected a list"),
    ("unet", "down_block_types", ["Nope", "DownBlock2D", "DownBlock2D"], "unsupported down_block_types"),
    ("unet", "up_block_types", ["UpBlock2D"] * 3, "must mirror down_block_types"),
    ("unet", "addition_embed_type", "text_time", "an SDXL U-Net"),
    ("unet", "transformer_layers_per_block", 2, "transformer_layers_per_block=2 is not supported"),
    ("vae", "scaling_factor", 0, "scaling_factor = 0; expected a finite number in (0, 100]"),
    ("vae", "scaling_factor", -0.18215, "scaling_factor = -0.18215"),
    ("vae", "scaling_factor", 1e30, "scaling_factor = 1e+30"),
    ("vae", "scaling_factor", "0.18215", "scaling_factor = '0.18215'"),
    ("vae", "layers_per_block", 1000000, "VAEConfig.layers_per_block = 1000000"),
    ("vae", "block_out_channels", [32, 32, 60], "must divide by 8"),
    ("vae", "block_out_channels", [32] * 9, "expected a list of 1..8 entries"),
    ("vae", "block_out_channels", {"a": 1}, "expected a list"),
    ("vae", "latent_channels", 0, "latent_channels = 0"),
    ("vae", "in_channels", 1000, "in_channels = 1000"),
    ("vae", "norm_num_groups", -8, "norm_num_groups = -8"),
    ("vae", "sample_size", 0, "sample_size = 0; expected an integer in 8..8192"),
    ("vae", "force_upcast", "true", "force_upcast = 'true'"),
    ("vae", "down_block_types", "DownEncoderBlock2D", "expected a list"),
    ("vae", "shift_factor", 0.1159, "unsupported VAE config shift_factor"),
    ("text", "vocab_size", 0, "vocab_size = 0; expected an integer in 1..1000000"),
    ("text", "vocab_size", 10**12, "vocab_size = 1000000000000"),
    ("text", "hidden_size", 130, "hidden_size 130 must divide by heads 4"),
    ("text", "hidden_size", 0, "hidden_size = 0"),
    ("text", "num_attention_heads", 0, "num_attention_heads = 0"),
    ("text", "num_hidden_layers", 10**6, "num_hidden_layers = 1000000; expected an integer in 1..64"),
    ("text", "intermediate_size", -1, "intermediate_size = -1"),
    ("text", "max_position_embeddings", 0, "max_position_embeddings = 0"),
    ("text", "layer_norm_eps", 0.0, "layer_norm_eps = 0.0"),
    ("text", "eos_token_id", 656, "eos_token_id = 656; expected an integer in 0..655"),
    ("text", "hidden_act", "relu", "hidden_act 'relu' not in"),
    ("text", "hidden_act", ["gelu"], "hidden_act ['gelu'] not in"),
    ("text", "model_type", "t5", "model_type 't5' is not a CLIP text model"),
    ("sched", "num_train_timesteps", 10**10, "num_train_timesteps = 10000000000; expected an integer in 1..100000"),
    ("sched", "num_train_timesteps", 0, "num_train_timesteps = 0"),
    ("sched", "num_train_timesteps", 1000.0, "num_train_timesteps = 1000.0"),
    ("sched", "beta_start", 0, "beta_start = 0; expected a finite number in (0, 0.999]"),
    ("sched", "beta_end", 2.0, "beta_end = 2.0"),
    ("sched", "beta_end", "0.012", "beta_end = '0.012'"),
    ("sched", "steps_offset", -1, "steps_offset = -1; expected an integer in 0..999"),
    ("sched", "beta_schedule", "exponential", "unknown beta_schedule 'exponential'"),
    ("sched", "prediction_type", "noise", "unknown prediction_type 'noise'"),
    ("sched", "timestep_spacing", "random", "unknown timestep_spacing 'random'"),
    ("sched", "set_alpha_to_one", "no", "set_alpha_to_one = 'no'"),
    ("sched", "trained_betas", [0.1] * 1000, "trained_betas are not supported"),
]


@pytest.mark.parametrize("which, field, value, fragment", CONFIG_CASES,
                         ids=[f"{w}-{f}-{str(v)[:12]}" for w, f, v, _ in CONFIG_CASES])
def test_bad_config_field(tmp_path, which, field, value, fragment):
    folder = tiny_copy(tmp_path)
    edit_json(folder, which, **{field: value})
    with pytest.raises(WeightsError) as e:
        weights.read_diffusers_folder(folder)
    msg = str(e.value)
    assert fragment in msg and str(folder / CONFIGS[which]) in msg and "\n" not in msg, msg


# ─── files that are not what they claim: malformed JSON, bad weights, escaping shard indexes ──────

def write(rel: str, data: bytes | str):
    def apply(folder: Path):
        path = folder / rel
        path.unlink(missing_ok=True)
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return apply


def tensors(rel: str, change):
    """Rewrite one weights file with `change(state_dict)` applied."""
    def apply(folder: Path):
        path = folder / rel
        sd = load_file(TINY / rel)
        change(sd)
        path.unlink()
        save_file(sd, path)
    return apply


def setitem(key, value_fn):
    return lambda sd: sd.__setitem__(key, value_fn(sd[key]))


def nan_at(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def shard(index: dict | str | list, link: str | None = None, target: Path | None = None):
    """Replace the text encoder's weights by a shard index (and optionally a symlink)."""
    def apply(folder: Path):
        sub = folder / "text_encoder"
        (sub / "model.safetensors").unlink()
        (sub / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
        if link:
            (sub / link).symlink_to(target)
    return apply


def outside_file(folder: Path) -> Path:
    path = folder.parent / "elsewhere.safetensors"
    shutil.copy(TINY / WEIGHTS["text"], path)
    return path


U, V, T = WEIGHTS["unet"], WEIGHTS["vae"], WEIGHTS["text"]
TE = "text_model.embeddings.token_embedding.weight"
FILE_CASES = [
    # malformed JSON configs
    ("unet-config-not-json", write(CONFIGS["unet"], "{not json"), "unet/config.json: config is not valid JSON"),
    ("vae-config-empty", write(CONFIGS["vae"], ""), "vae/config.json: config is not valid JSON"),
    ("text-config-list", write(CONFIGS["text"], "[1, 2]"), "config must be a JSON object {...}, got list"),
    ("sched-config-null", write(CONFIGS["sched"], "null"), "got NoneType"),
    ("sched-config-binary", write(CONFIGS["sched"], b"\xff\xfe\x00garbage"), "config is not UTF-8 text"),
    ("index-not-json", write(CONFIGS["index"], "{'a': 1}"), "model_index.json: model_index.json is not valid JSON"),
    ("index-string", write(CONFIGS["index"], '"StableDiffusionPipeline"'), "got str"),
    ("index-sdxl", write(CONFIGS["index"], '{"_class_name": "StableDiffusionXLPipeline"}'), "has no text_encoder_2 in model_index.json: not an SDXL pipeline"),
    ("index-class-not-str", write(CONFIGS["index"], '{"_class_name": 5}'), None),  # harmless: loads
    ("config-truncated", write(CONFIGS["unet"], (TINY / CONFIGS["unet"]).read_text()[:200]), "not valid JSON"),
    # weight files: empty, truncated, garbage, lies in the header
    ("unet-empty", write(U, b""), "not a readable safetensors file"),
    ("vae-truncated", write(V, (TINY / V).read_bytes()[:5000]), "not a readable safetensors file"),
    ("text-garbage", write(T, b"\x00" * 64), "not a readable safetensors file"),
    ("text-huge-header", write(T, (1 << 40).to_bytes(8, "little") + b"{}"), "header size 1099511627776"),
    ("text-header-not-json", write(T, (8).to_bytes(8, "little") + b"notjson!"), "bad header"),
    ("text-lfs-pointer", write(T, b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"),
     "not a readable safetensors file"),
    ("unet-int-dtype", tensors(U, setitem("conv_in.weight", lambda t: t.to(torch.int32))),
     "tensor conv_in.weight has dtype I32; expected a floating-point dtype"),
    ("vae-bool-dtype", tensors(V, setitem("encoder.conv_in.bias", lambda t: t > 0)),
     "tensor encoder.conv_in.bias has dtype BOOL"),
    ("text-uint8-dtype", tensors(T, setitem(TE, lambda t: t.to(torch.uint8))), f"tensor {TE} has dtype U8"),
    ("unet-nan", tensors(U, setitem("conv_out.bias", nan_at)), "tensor conv_out.bias has 1 non-finite values"),
    ("vae-inf", tensors(V, setitem("decoder.conv_out.weight", lambda t: t + float("inf"))),
     "tensor decoder.conv_out.weight has 864 non-finite values"),
    ("text-nan", tensors(T, setitem(TE, nan_at)), f"tensor {TE} has 1 non-finite values"),
    ("text-neg-inf-fp16", tensors(T, setitem(TE, lambda t: torch.full_like(t, -float("inf")).half())),
     "non-finite values (NaN or inf)"),
    ("unet-missing-key", tensors(U, lambda sd: sd.pop("conv_in.bias")), "missing 1 keys: conv_in.bias"),
    ("vae-extra-key", tensors(V, lambda sd: sd.__setitem__("extra", torch.zeros(1))), "unexpected 1 keys: extra"),
    ("unet-levels-disagree", lambda f: edit_json(f, "unet", layers_per_block=2),
     "says layers_per_block = 2 but"),
    ("vae-levels-disagree", lambda f: edit_json(f, "vae", block_out_channels=[32, 32, 64, 64]),
     "says block_out_channels = (32, 32, 64, 64) but"),
    ("text-layers-disagree", lambda f: edit_json(f, "text", num_hidden_layers=8), "says num_hidden_layers = 8 but"),
    ("unet-no-weights", lambda f: (f / U).unlink(), "no weights file diffusion_pytorch_model.safetensors"),
    ("no-unet-config", lambda f: (f / CONFIGS["unet"]).unlink(), "has no config.json"),
    ("no-model-index", lambda f: (f / CONFIGS["index"]).unlink(), "not a diffusers pipeline folder"),
    # shard indexes
    ("shard-no-weight-map", shard({"metadata": {}}), 'shard index needs a non-empty "weight_map"'),
    ("shard-weight-map-list", shard({"weight_map": ["model.safetensors"]}), '"weight_map" object'),
    ("shard-weight-map-empty", shard({"weight_map": {}}), '"weight_map" object'),
    ("shard-value-int", shard({"weight_map": {TE: 5}}), "weight_map value 5 is not a file name"),
    ("shard-value-empty", shard({"weight_map": {TE: ""}}), "weight_map value '' is not a file name"),
    ("shard-dotdot", shard({"weight_map": {TE: "../../x.safetensors"}}), "shard '../../x.safetensors' is outside"),
    ("shard-absolute", shard({"weight_map": {TE: "/etc/passwd"}}), "shard '/etc/passwd' is outside"),
    ("shard-inner-dotdot", shard({"weight_map": {TE: "a/../../unet/x"}}), "is outside the folder"),
    ("shard-missing", shard({"weight_map": {TE: "model-00001.safetensors"}}), "'model-00001.safetensors' is missing"),
    ("shard-index-not-json", shard("{"), "shard index is not valid JSON"),
    ("shard-index-list", shard("[]"), "shard index must be a JSON object"),
]


def symlink_escape(folder: Path):
    target = outside_file(folder)
    shard({"weight_map": {TE: "link.safetensors"}}, "link.safetensors", target)(folder)


FILE_CASES.append(("shard-symlink-escape", symlink_escape, "shard 'link.safetensors' is outside the folder"))


@pytest.mark.parametrize("name, corrupt, fragment", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files(tmp_path, name, corrupt, fragment):
    folder = tiny_copy(tmp_path)
    corrupt(folder)
    if fragment is None:
        weights.read_diffusers_folder(folder)
        return
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert fragment in str(e.value), str(e.value)


def test_shard_index_loads_inside_folder(tmp_path):
    """The checks refuse escapes, not shards: a well-formed index with two shards loads."""
    folder = tiny_copy(tmp_path)
    sd = load_file(TINY / T)
    keys = sorted(sd)
    sub = folder / "text_encoder"
    (sub / "model.safetensors").unlink()
    save_file({k: sd[k] for k in keys[:10]}, sub / "model-1.safetensors")
    save_file({k: sd[k] for k in keys[10:]}, sub / "model-2.safetensors")
    wmap = {k: "model-1.safetensors" if i < 10 else "model-2.safetensors" for i, k in enumerate(keys)}
    (sub / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    parts = weights.read_diffusers_folder(folder)
    assert parts.text_encoder[1].keys() == weights.fix_text_encoder_keys(sd).keys()


SINGLE_FILE_CASES = [
    ("empty", b"", "not a readable safetensors file"),
    ("not-sd", {"foo": torch.zeros(2)}, "has no U-Net"),
    ("half-unet", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                   "first_stage_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1)},
     "cannot read the model's shape off its tensors"),
    ("wrong-rank", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8),
                    "first_stage_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1)},
     "input_blocks.0.0.weight has shape (8,); expected a 4-d conv weight"),
    ("unknown-suffix", None, "unknown weights format '.gguf'"),
]


@pytest.mark.parametrize("name, content, fragment", SINGLE_FILE_CASES, ids=[c[0] for c in SINGLE_FILE_CASES])
def test_bad_single_file(tmp_path, name, content, fragment):
    path = tmp_path / ("model.gguf" if content is None else "model.safetensors")
    if isinstance(content, dict):
        save_file(content, path)
    else:
        path.write_bytes(content or b"x")
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert fragment in str(e.value), str(e.value)


def test_single_file_bad_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "first_stage_model.x": torch.zeros(1), "cond_stage_model.transformer.x": torch.zeros(1)},
              path, metadata={"minisd_config": '{"unet": {"layers_per_block": 1000000}}'})
    with pytest.raises(WeightsError, match="bad minisd_config metadata"):
        StableDiffusion.from_pretrained(path, device="cpu")


TOKENIZER_CASES = [
    ("vocab-not-json", "vocab.json", "{", "is not a valid JSON vocabulary"),
    ("vocab-list", "vocab.json", "[1]", "must be a non-empty JSON object of token -> integer id"),
    ("vocab-str-ids", "vocab.json", '{"a": "1"}', "must be a non-empty JSON object"),
    ("special-bad-pad", "special_tokens_map.json", '{"pad_token": 5}', "pad_token must be a token string"),
]


@pytest.mark.parametrize("name, file, text, fragment", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_bad_tokenizer(tmp_path, name, file, text, fragment):
    folder = tmp_path / "tok"
    shutil.copytree(TINY / "tokenizer", folder)
    (folder / file).write_text(text)
    with pytest.raises(ValueError) as e:
        Tokenizer(folder)
    assert fragment in str(e.value)


# ─── pictures: every mode read as what it shows; bad files and bad tensors refused ─────────────────

def gray16(value: int) -> Image.Image:
    return Image.frombytes("I;16", (16, 16), np.full((16, 16), value, "<u2").tobytes())


RED = Image.new("RGB", (16, 16), (255, 0, 0))
MODE_CASES = [  # (name, picture, expected first pixel in [0, 1])
    ("RGB", RED, (1, 0, 0)),
    ("RGBA-alpha-dropped", Image.new("RGBA", (16, 16), (255, 0, 0, 0)), (1, 0, 0)),
    ("LA-alpha-dropped", Image.new("LA", (16, 16), (51, 0)), (0.2, 0.2, 0.2)),
    ("L", Image.new("L", (16, 16), 255), (1, 1, 1)),
    ("1", Image.new("1", (16, 16), 1), (1, 1, 1)),
    ("P", RED.convert("P"), (1, 0, 0)),
    ("P-transparency", RED.convert("P"), (1, 0, 0)),
    ("PA", RED.convert("P").convert("PA"), (1, 0, 0)),
    ("CMYK", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), (1, 0, 0)),
    ("YCbCr", RED.convert("YCbCr"), (254 / 255, 0, 0)),
    ("I;16-half", gray16(32768), (32768 / 65535,) * 3),
    ("I;16-white", gray16(65535), (1, 1, 1)),
    ("I;16B", Image.frombytes("I;16B", (16, 16), np.full((16, 16), 65535, ">u2").tobytes()), (1, 1, 1)),
    ("I-16bit", gray16(65535).convert("I"), (1, 1, 1)),
    ("F", Image.fromarray(np.full((16, 16), 0.25, np.float32)), (0.25, 0.25, 0.25)),
    ("array-uint8", np.full((16, 16, 3), 255, np.uint8), (1, 1, 1)),
    ("array-uint16", np.full((16, 16), 65535, np.uint16), (1, 1, 1)),
    ("array-float", np.full((16, 16, 3), 0.5, np.float32), (0.5, 0.5, 0.5)),
    ("array-rgba", np.full((16, 16, 4), 255, np.uint8), (1, 1, 1)),
    ("tensor", torch.full((3, 16, 16), 0.5), (0.5, 0.5, 0.5)),
]
MODE_CASES[6][1].info["transparency"] = 0


@pytest.mark.parametrize("name, picture, rgb", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_picture_modes(tmp_path, name, picture, rgb):
    x = image_to_tensor(picture)
    assert x.shape == (1, 3, 16, 16)
    assert torch.allclose((x[0, :, 0, 0] + 1) / 2, torch.tensor(rgb, dtype=torch.float32), atol=2e-3), x[0, :, 0, 0]
    if isinstance(picture, Image.Image) and picture.mode not in ("PA", "P", "YCbCr"):  # and through a file
        path = tmp_path / ("p.tiff" if picture.mode in ("F", "CMYK", "I", "I;16B", "LA") else "p.png")
        picture.save(path)
        assert torch.allclose(image_to_tensor(path), x, atol=1e-6)


def png_bytes(picture: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return buf.getvalue()


BAD_PICTURES = [  # (name, input: bytes for a file or an object, exception, fragment)
    ("text-file", b"hello, not a picture", ValueError, "is not a readable picture"),
    ("empty-file", b"", ValueError, "is not a readable picture"),
    ("truncated-png", png_bytes(Image.effect_noise((64, 64), 50))[:300], ValueError, "is not a readable picture"),
    ("png-header-only", png_bytes(RED)[:8], ValueError, "is not a readable picture"),
    ("tensor-0-255", torch.full((3, 16, 16), 255.0), ValueError, "values span [255, 255]; expected [0, 1]"),
    ("tensor-minus1-1", torch.full((1, 3, 16, 16), -1.0), ValueError, "expected [0, 1]"),
    ("tensor-uint8", torch.full((3, 16, 16), 200, dtype=torch.uint8), ValueError, "expected [0, 1]"),
    ("tensor-nan", torch.full((3, 16, 16), float("nan")), ValueError, "contains NaN or infinite values"),
    ("tensor-inf", torch.full((3, 16, 16), float("inf")), ValueError, "contains NaN or infinite values"),
    ("tensor-4-channels", torch.zeros(4, 16, 16), ValueError, "expected (3, H, W) or (B, 3, H, W)"),
    ("tensor-2d", torch.zeros(16, 16), ValueError, "expected (3, H, W)"),
    ("tensor-5d", torch.zeros(1, 1, 3, 16, 16), ValueError, "expected (3, H, W)"),
    ("tensor-zero-size", torch.zeros(1, 3, 0, 0), ValueError, "image is 0x0 px; expected at least 8x8"),
    ("tensor-tiny", torch.zeros(3, 4, 64), ValueError, "image is 64x4 px"),
    ("picture-7px", Image.new("RGB", (7, 64)), ValueError, "image is 7x64 px"),
    ("picture-1px", Image.new("L", (1, 1)), ValueError, "image is 1x1 px"),
    ("array-int64", np.zeros((16, 16, 3), np.int64), ValueError, "array has dtype int64"),
    ("array-2-channels", np.zeros((16, 16, 2), np.uint8), ValueError, "array has shape (16, 16, 2)"),
    ("array-float-255", np.full((16, 16, 3), 255.0, np.float32), ValueError, "expected [0, 1]"),
    ("array-nan", np.full((16, 16), np.nan, np.float32), ValueError, "contains NaN"),
    ("F-mode-0-255", Image.fromarray(np.full((16, 16), 200.0, np.float32)), ValueError, "expected [0, 1]"),
    ("I-mode-negative", Image.fromarray(np.full((16, 16), -5, np.int32)), ValueError, "expected [0, 1]"),
    ("empty-list", [], ValueError, "image is an empty list"),
    ("wrong-type", 42, TypeError, "must be a PIL image, a tensor, an array or a path, got int"),
    ("missing-file", "no/such/picture.png", FileNotFoundError, "image file not found"),
]


@pytest.mark.parametrize("name, picture, exc, fragment", BAD_PICTURES, ids=[c[0] for c in BAD_PICTURES])
def test_bad_pictures(tmp_path, name, picture, exc, fragment):
    if isinstance(picture, bytes):
        path = tmp_path / "picture.png"
        path.write_bytes(picture)
        picture = path
    with pytest.raises(exc) as e:
        image_to_tensor(picture)
    assert fragment in str(e.value), str(e.value)
    if isinstance(picture, Path):
        assert str(picture) in str(e.value)


BAD_SIZES = [("height", 0), ("height", 4), ("width", -8), ("width", 8.0), ("height", True)]


@pytest.mark.parametrize("field, value", BAD_SIZES)
def test_bad_requested_size(field, value):
    with pytest.raises(ValueError, match=f"{field} = {value!r}; expected an integer of at least 8 px"):
        image_to_tensor(RED, **{field: value})


BAD_MASKS = [
    ("mask-0-255", torch.full((1, 1, 16, 16), 255.0), "mask_image values span [255, 255]"),
    ("mask-nan", torch.full((16, 16), float("nan")), "mask_image contains NaN"),
    ("mask-1d", torch.zeros(16), "mask_image tensor has shape (16,)"),
    ("mask-size", Image.new("L", (8, 8)), "mask_image is 8x8 but the image is 16x16"),
]


@pytest.mark.parametrize("name, mask, fragment", BAD_MASKS, ids=[c[0] for c in BAD_MASKS])
def test_bad_masks(name, mask, fragment):
    with pytest.raises(ValueError) as e:
        mask_to_tensor(mask, 16, 16)
    assert fragment in str(e.value)


def test_mask_modes():
    """A 16-bit mask is not all white; 0/1 integer and bool masks still work."""
    assert mask_to_tensor(gray16(1000), 16, 16).sum() == 0
    assert mask_to_tensor(gray16(65535), 16, 16).mean() == 1
    assert mask_to_tensor(torch.ones(16, 16, dtype=torch.bool), 16, 16).mean() == 1
    assert mask_to_tensor(torch.ones(1, 1, 16, 16, dtype=torch.int64), 16, 16).mean() == 1


# ─── interrupted writes keep the old file ──────────────────────────────────────────────────────────

def half_then_fail(tmp: Path):
    tmp.write_bytes(b"half a file")
    raise OSError(28, "No space left on device")


def interrupt(tmp: Path):
    tmp.write_bytes(b"half")
    raise KeyboardInterrupt


WRITE_CASES = [
    ("disk-full", lambda p: atomic_write(p, half_then_fail), OSError),
    ("interrupted", lambda p: atomic_write(p, interrupt), KeyboardInterrupt),
    ("json-not-serialisable", lambda p: weights.write_json({"a": object()}, p), TypeError),
    ("safetensors-bad-value", lambda p: weights.write_safetensors({"a": "not a tensor"}, p), AttributeError),
    ("safetensors-shared-memory", lambda p: weights.write_safetensors({"a": torch.zeros(2)[:1], "b": 1}, p),
     AttributeError),
]


@pytest.mark.parametrize("name, action, exc", WRITE_CASES, ids=[c[0] for c in WRITE_CASES])
def test_failed_write_keeps_old_file(tmp_path, name, action, exc):
    path = tmp_path / "model.safetensors"
    atomic_write_text(path, "the old, valid file")
    with pytest.raises(exc):
        action(path)
    assert path.read_text() == "the old, valid file"
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind


def test_save_pretrained_over_itself_is_atomic(tmp_path, monkeypatch):
    """A save that fails halfway (disk full while writing the VAE) leaves the previous save loadable."""
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu", dtype=torch.float32)
    pipe.save_pretrained(tmp_path / "out")
    import safetensors.torch

    real = safetensors.torch.save_file

    def fail_on_vae(tensors, filename, metadata=None):
        if "vae" in str(filename):
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_vae)
    with pytest.raises(OSError):
        pipe.save_pretrained(tmp_path / "out")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "out" / "vae")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    StableDiffusion.from_pretrained(tmp_path / "out", device="cpu")
