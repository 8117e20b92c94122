"""Loading and saving every on-disk form of Stable Diffusion weights, and refusing bad ones clearly."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import report
from safetensors.torch import load_file, save_file

import minisd
from minisd import StableDiffusion, WeightsError, save_single_file
from minisd.formats import weights
from minisd.formats.weights import convert_single_file, read_state_dict

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sd15_single_file_keys.json"


def assert_same_weights(a: StableDiffusion, b: StableDiffusion, atol: float = 0.0):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol, rtol=0), f"{name}.{k}"


def same_outputs(a: StableDiffusion, b: StableDiffusion):
    ids = a.tokenizer(["a red circle on the left"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx_a, ctx_b = a.text_encoder(ids), b.text_encoder(ids)
        report("round trip text encoder", ctx_a, ctx_b, rtol=1e-5)
        report("round trip unet", a.unet(z, 500, ctx_a), b.unet(z, 500, ctx_b), rtol=1e-5)
        report("round trip vae", a.vae.decode(z), b.vae.decode(z), rtol=1e-5)


# ─── diffusers folders ─────────────────────────────────────────────────────────────────────────────

@pytest.fixture(scope="module")
def diffusers_folder(tiny_folder, tmp_path_factory):
    """Our save_pretrained, loaded by diffusers and saved again by diffusers: its own on-disk layout."""
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    out = tmp_path_factory.mktemp("diffusers_saved")
    pipe.save_pretrained(out)
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_folder_saved_by_diffusers_loads(diffusers_folder, tiny_pipe):
    loaded = StableDiffusion.from_pretrained(diffusers_folder, device="cpu")
    assert_same_weights(loaded, tiny_pipe)
    assert loaded.tokenizer(["a red circle"]).tolist() == tiny_pipe.tokenizer(["a red circle"]).tolist()
    index = json.loads((diffusers_folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]  # tolerated


def test_pickled_bin_files(diffusers_folder, tiny_pipe, tmp_path):
    folder = copy(diffusers_folder, tmp_path / "bin")
    for sub, st, bin_name in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                              ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model"),
                              ("text_encoder", "model", "pytorch_model")):
        sd = load_file(folder / sub / f"{st}.safetensors")
        torch.save(sd, folder / sub / f"{bin_name}.bin")
        (folder / sub / f"{st}.safetensors").unlink()
    assert_same_weights(StableDiffusion.from_pretrained(folder, device="cpu"), tiny_pipe)


def test_fp16_variant(diffusers_folder, tiny_pipe, tmp_path):
    folder = copy(diffusers_folder, tmp_path / "fp16")
    for sub, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        sd = {k: v.half() for k, v in load_file(folder / sub / f"{stem}.safetensors").items()}
        save_file(sd, folder / sub / f"{stem}.fp16.safetensors")
        (folder / sub / f"{stem}.safetensors").unlink()
    loaded = StableDiffusion.from_pretrained(folder, device="cpu", variant="fp16")
    assert loaded.dtype == torch.float32  # fp16 files, upcast to the requested (default) dtype
    assert_same_weights(loaded, tiny_pipe, atol=2e-3)
    half = StableDiffusion.from_pretrained(folder, device="cpu", variant="fp16", dtype=torch.float16)
    assert half.dtype == torch.float16
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        StableDiffusion.from_pretrained(folder, device="cpu")  # no variant asked: the plain files are missing


def test_legacy_vae_attention_names_and_text_encoder_prefixes(diffusers_folder, tiny_pipe, tmp_path):
    folder = copy(diffusers_folder, tmp_path / "legacy")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in load_file(vae_file).items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[k] = v
    assert any(".query." in k for k in sd) and not any(".to_q." in k for k in sd)
    save_file(sd, vae_file)
    te_file = folder / "text_encoder" / "model.safetensors"
    te = load_file(te_file)
    flipped = {(k[len("text_model."):] if k.startswith("text_model.") else "text_model." + k): v for k, v in te.items()}
    flipped["text_model.embeddings.position_ids"] = torch.arange(77.0)[None]  # as some (merged) files carry it
    save_file(flipped, te_file)
    assert_same_weights(StableDiffusion.from_pretrained(folder, device="cpu"), tiny_pipe)


def test_minisd_folder_loads_in_diffusers(tiny_folder, tiny_pipe):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = tiny_pipe.tokenizer(["a blue square"])
    with torch.no_grad():
        ctx = tiny_pipe.text_encoder(ids)
        report("diffusers-loaded text encoder", ctx, pipe.text_encoder(ids)[0], rtol=1e-5)
        report("diffusers-loaded unet", tiny_pipe.unet(z, 10, ctx), pipe.unet(z, 10, ctx).sample, rtol=1e-5)


def test_save_pretrained_round_trip(tiny_pipe, tiny_folder):
    loaded = StableDiffusion.from_pretrained(tiny_folder, device="cpu")
    assert_same_weights(loaded, tiny_pipe)
    same_outputs(loaded, tiny_pipe)
    assert loaded.config == tiny_pipe.config


# ─── single files ──────────────────────────────────────────────────────────────────────────────────

def test_single_file_round_trip(tiny_pipe, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file(tiny_pipe, path)
    keys = load_file(path).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in keys
    assert load_file(path)["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM's 1×1 conv
    loaded = StableDiffusion.from_pretrained(path, device="cpu", tokenizer=tiny_pipe.tokenizer)
    assert_same_weights(loaded, tiny_pipe)
    assert loaded.config == tiny_pipe.config


class ModelCheckpoint:
    """Stands for pytorch_lightning's callback, which real training .ckpt files pickle."""

    def __init__(self):
        self.best_model_score = torch.tensor(0.5)


def write_lightning_ckpt(sd: dict, path: Path, ema: bool = False):
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    ModelCheckpoint.__module__ = names[-1]
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    try:
        torch.save({"epoch": 3, "global_step": 470000, "state_dict": sd,
                    "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    finally:
        for name in names:  # loading must not need (or import) it
            del sys.modules[name]


def test_lightning_ckpt_with_ema_and_schedule_buffers(tiny_pipe, tmp_path):
    single = tmp_path / "model.safetensors"
    save_single_file(tiny_pipe, single)
    sd = load_file(single)
    from minisd.diffusion.schedules import SchedulerConfig

    sd["betas"] = SchedulerConfig().betas()
    sd["alphas_cumprod"] = SchedulerConfig().alphas_cumprod()
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    for k in unet_keys:  # the EMA copy, as LitEma stores it; the raw weights become garbage
        sd["model_ema." + k[len("model."):].replace(".", "")] = sd[k].clone()
        sd[k] = torch.zeros_like(sd[k])
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(1000)
    path = tmp_path / "model.ckpt"
    write_lightning_ckpt(sd, path)
    meta = json.loads(json.dumps({"minisd_config": tiny_pipe.config.to_json()}))
    parts = convert_single_file(read_state_dict(path), str(path), meta)
    assert torch.equal(parts.unet[1]["conv_in.weight"], tiny_pipe.unet.state_dict()["conv_in.weight"])  # EMA used


def test_sd15_single_file_fixture_matches_diffusers_conversion():
    """Every tensor of a real SD 1.5 single file (shapes from shared/fixtures), random values: minisd's
    converter gives exactly what diffusers' own single-file conversion gives, and fills SD 1.5."""
    diffusers_sf = pytest.importorskip("diffusers.loaders.single_file_utils")
    shapes = json.loads(FIXTURE.read_text())
    assert len(shapes) == 1131
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.arange(77)[None] if k.endswith("position_ids") else
              torch.randn(v, generator=g, dtype=torch.float32).to(torch.float16)) for k, v in shapes.items()}
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    parts = convert_single_file(sd, "sd15 fixture")
    assert parts.unet[0] == minisd.SD15.unet and parts.vae[0] == minisd.SD15.vae
    assert parts.text_encoder[0] == minisd.SD15.text_encoder
    ref_unet = diffusers_sf.convert_ldm_unet_checkpoint(sd, minisd.SD15.unet.to_diffusers())
    ref_vae = diffusers_sf.convert_ldm_vae_checkpoint(sd, minisd.SD15.vae.to_diffusers())
    for name, ours, ref in (("unet", parts.unet[1], ref_unet), ("vae", parts.vae[1], ref_vae)):
        assert ours.keys() == ref.keys(), name
        bad = [k for k in ours if not torch.equal(ours[k], ref[k].reshape(ours[k].shape))
               or ours[k].shape != ref[k].shape]
        assert not bad, f"{name}: {bad[:5]}"
    # and every parameter of the SD 1.5 modules is filled, every tensor used (load_strict raises otherwise)
    pipe = StableDiffusion._assemble(parts, minisd.Tokenizer.clip_vit_l(), torch.device("cpu"), torch.float16,
                                     "sd15", "fixture")
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964


# ─── bad input ─────────────────────────────────────────────────────────────────────────────────────

def test_missing_path():
    with pytest.raises(FileNotFoundError, match="neither a file"):
        StableDiffusion.from_pretrained("/no/such/model.safetensors")


def test_truncated_file(tiny_pipe, tmp_path):
    path = tmp_path / "model.safetensors"
    save_single_file(tiny_pipe, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        StableDiffusion.from_pretrained(path, device="cpu", tokenizer=tiny_pipe.tokenizer)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_state_dict(ckpt)


def test_missing_component_folder(tiny_folder, tmp_path):
    folder = copy(tiny_folder, tmp_path / "novae")
    shutil.rmtree(folder / "vae")
    with pytest.raises(WeightsError, match="no vae/ folder"):
        StableDiffusion.from_pretrained(folder, device="cpu")


def test_missing_tensor_and_wrong_shape(tiny_folder, tmp_path):
    folder = copy(tiny_folder, tmp_path / "broken")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    del sd["mid_block.attentions.0.proj_out.weight"]
    sd["conv_in.weight"] = torch.zeros(32, 4, 5, 5)
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, f)
    with pytest.raises(WeightsError) as e:
        StableDiffusion.from_pretrained(folder, device="cpu")
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors" in msg and "missing 1 keys: mid_block.attentions.0.proj_out.weight" in msg
    assert "unexpected 1 keys: extra.weight" in msg and "conv_in.weight: file (32, 4, 5, 5) vs model (32, 4, 3, 3)" in msg


def test_sdxl_file_is_named(tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, path)
    with pytest.raises(WeightsError, match="SDXL"):
        StableDiffusion.from_pretrained(path, device="cpu")


def test_sdxl_folder_is_named(tiny_folder, tmp_path):
    folder = copy(tiny_folder, tmp_path / "xl")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["addition_embed_type"] = "text_time"
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="SDXL"):
        StableDiffusion.from_pretrained(folder, device="cpu")


class Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    exploit = Exploit()
    exploit.target = str(marker)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": exploit}, path)
    with pytest.raises(WeightsError, match="pathlib"):
        StableDiffusion.from_pretrained(path, device="cpu")
    assert not marker.exists()
    raw = tmp_path / "evil.pt"  # a plain pickle protocol stream, not even a zip
    raw.write_bytes(pickle.dumps(exploit))
    with pytest.raises(WeightsError):
        read_state_dict(raw)
    assert not marker.exists()


def test_hub_offline_error(monkeypatch):
    import huggingface_hub.constants as hub_constants  # a submodule: `huggingface_hub.constants` is not an attribute in 2.x

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="huggingface-cli download"):
        StableDiffusion.from_pretrained("minisd-tests/no-such-model", device="cpu")


SD3_REPO = {"model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
            "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
            "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
            "text_encoder_3/config.json", "text_encoder_3/model.safetensors.index.json",
            "text_encoder_3/model-00001-of-00002.safetensors", "text_encoder_3/model-00002-of-00002.safetensors",
            "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_3/spiece.model",
            "tokenizer_3/tokenizer.json", "scheduler/scheduler_config.json", "sd3_medium.safetensors", "README.md"}


def test_hub_download_takes_each_network_a_repo_holds():
    """SD 3's repo: the transformer and three text encoders (T5's in shards), safetensors only, no single file."""
    wanted = set(weights.wanted_files("org/sd3", SD3_REPO))
    assert {"transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
            "text_encoder_3/model-*-of-*.safetensors", "tokenizer_3/spiece.model", "model_index.json"} <= wanted
    assert not wanted & {"vae/diffusion_pytorch_model.bin", "text_encoder/model.fp16.safetensors",
                         "sd3_medium.safetensors", "README.md"}
    sd15 = {f for f in SD3_REPO if not f.startswith(("transformer", "text_encoder_", "tokenizer_"))} | {
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors"}
    assert {f for f in weights.wanted_files("org/sd15", sd15) if f.endswith(".safetensors")} == {"unet/diffusion_pytorch_model.safetensors",
                                                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    with pytest.raises(WeightsError, match="no transformer weights for variant 'fp16'"):
        weights.wanted_files("org/sd3", SD3_REPO, "fp16")


# ─── tokenizer ─────────────────────────────────────────────────────────────────────────────────────

def test_clip_tokenizer_is_sd15s():
    tok = minisd.Tokenizer.clip_vit_l()
    assert len(tok) == 49408
    ids = tok(["a photo of a cat"])
    assert ids.shape == (1, 77)
    # the ids openai/clip-vit-large-patch14 gives (transformers' CLIPTokenizer docs), then EOS padding
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()


def test_long_prompt_warns_and_truncates():
    tok = minisd.Tokenizer.clip_vit_l()
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok(["red " * 100])
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_every_shapes_world_word_is_one_token(tmp_path):
    from minisd import shapes
    from minisd.models.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(shapes.VOCABULARY, tmp_path)
    for word in shapes.VOCABULARY:
        ids = tok([word])[0]
        assert (ids != tok.eos_id).sum() == 2, (word, tok.decode(ids[:6]))  # BOS + the word


def test_word_tokenizer(tokenizer):
    ids = tokenizer(["a large red circle"])[0]
    assert ids[0] == tokenizer.bos_id and ids[5] == tokenizer.eos_id and (ids[5:] == tokenizer.eos_id).all()
    assert tokenizer.decode(ids[1:5]) == ["a</w>", "large</w>", "red</w>", "circle</w>"]
