"""SD 3's MMDiT and T5 encoder equal diffusers' SD3Transformer2DModel and transformers' T5EncoderModel.

Numerically on identical random weights at toy widths (fp32, CPU); at the real SD 3 / 3.5 and T5-XXL
configs (built on the meta device) every parameter name and shape; the T5 tokenizer's ids equal
transformers' T5TokenizerFast on a unigram tokenizer.json built here, and the same pieces written as a
SentencePiece spiece.model give the same ids.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import report

from minisd.models.mmdit import JointTransformerBlock, MMDiT, MMDiTConfig, sincos_pos_embed_2d
from minisd.models.sd3_configs import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, T5_XXL, TINY_MMDIT, TINY_T5
from minisd.models.t5 import T5Config, T5Encoder, relative_position_bucket
from minisd.models.tokenizer_t5 import T5Tokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# the brief's reduced size: 3 blocks (so a middle block, and the last with context_pre_only), 2 heads of 16,
# sample_size 32 in a 48-patch table; odd text widths so a swapped projection cannot pass by accident
SMALL = replace(TINY_MMDIT, num_layers=3, attention_head_dim=16, caption_projection_dim=32,
                joint_attention_dim=40, pooled_projection_dim=24)


def reference_mmdit(cfg: MMDiTConfig):
    torch.manual_seed(0)
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    return diffusers.SD3Transformer2DModel(**kwargs).eval()


def perturbed(state_dict: dict, seed: int) -> dict:
    """Every weight moved off its initial value (norm weights of 1, zero biases), so a parameter that
    our forward forgot to use cannot pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in state_dict.items()}


def ours(cls, cfg, state_dict):
    with torch.device("meta"):
        model = cls(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)  # strict: every name matches, no key map
    return model.eval()


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_mmdit_matches_diffusers(variant):
    cfg = SMALL if variant == "sd3" else replace(SMALL, qk_norm="rms_norm", dual_attention_layers=(0, 1))
    ref = reference_mmdit(cfg)
    ref.load_state_dict(perturbed(ref.state_dict(), seed=1))
    model = ours(MMDiT, cfg, ref.state_dict())
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 16, 24, 20, generator=g)  # not square, smaller than the table: a crop off centre rows
    context = torch.randn(2, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor([999.0, 3.5])
    with torch.no_grad():
        report(f"MMDiT {variant} (qk_norm={cfg.qk_norm})", model(z, context, pooled, t),
               ref(z, context, pooled, t).sample, rtol=1e-4)


@pytest.mark.parametrize("name,cfg", [("SD3 Medium", SD3_MEDIUM), ("SD3.5 Medium", SD35_MEDIUM)])
def test_mmdit_matches_diffusers_at_the_real_width(name, cfg):
    """The real models' widths (1536: 24 heads of 64; text 4096, pooled 2048; the 192- or 384-patch table) at reduced
    depth: two blocks, an ordinary one and the last (context_pre_only), SD 3.5's dual attention in the first."""
    cfg = replace(cfg, num_layers=2, dual_attention_layers=(0,) if cfg.dual_attention_layers else ())
    ref = reference_mmdit(cfg)
    ref.load_state_dict(perturbed(ref.state_dict(), seed=7))
    model = ours(MMDiT, cfg, ref.state_dict())
    g = torch.Generator().manual_seed(8)
    z = torch.randn(1, 16, 16, 12, generator=g)
    context = torch.randn(1, 10, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        out = model(z, context, pooled, torch.tensor([500.0]))
        report(f"MMDiT, {name} width, 2 blocks", out, ref(z, context, pooled, torch.tensor([500.0])).sample, rtol=1e-4)
    assert out.std() > 0.1  # a real output, not a zero that any model would match


def test_position_table_matches_diffusers():
    """The table is a buffer in the checkpoint; ours, built from the formula, equals diffusers' bit for bit."""
    for cfg in (SMALL, replace(SMALL, sample_size=20, pos_embed_max_size=30)):
        table = reference_mmdit(cfg).pos_embed.pos_embed[0]
        assert torch.equal(sincos_pos_embed_2d(cfg.dim, cfg.pos_embed_max_size, cfg.sample_size // 2), table)


@pytest.mark.parametrize("name,cfg", [("SD3 Medium", SD3_MEDIUM), ("SD3.5 Medium", SD35_MEDIUM),
                                      ("SD3.5 Large", SD35_LARGE)])
def test_mmdit_real_config_names_and_shapes(name, cfg):
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
        model = MMDiT(cfg)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected, f"{name}: missing {sorted(expected.keys() - got.keys())[:5]}, " \
                            f"unexpected {sorted(got.keys() - expected.keys())[:5]}"
    billions = sum(v.numel() for v in model.parameters()) / 1e9
    print(f"[shapes] {name}: {len(got)} tensors, {billions:.2f}B parameters, all equal to diffusers'")


def test_mmdit_config_round_trip_and_bad_input():
    for cfg in (SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE, SMALL):
        assert MMDiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    with pytest.raises(ValueError, match="caption_projection_dim"):
        replace(SMALL, caption_projection_dim=48)
    with pytest.raises(ValueError, match="qk_norm"):
        replace(SMALL, qk_norm="layer_norm")
    with pytest.raises(ValueError, match="dual_attention_layers"):
        replace(SMALL, dual_attention_layers=(5,))
    model = MMDiT(SMALL)
    context, pooled = torch.zeros(1, 3, SMALL.joint_attention_dim), torch.zeros(1, SMALL.pooled_projection_dim)
    with pytest.raises(ValueError, match="position table"):  # 100/2 = 50 patches > 48
        model(torch.zeros(1, 16, 100, 8), context, pooled, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="patch size"):
        model(torch.zeros(1, 16, 9, 8), context, pooled, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="text embeddings"):
        model(torch.zeros(1, 16, 8, 8), torch.zeros(1, 3, 7), pooled, torch.tensor([1.0]))


def test_adaln_zero_block_starts_as_identity():
    """adaLN-Zero: with the modulation Linear at zero, every gate is 0 and a block passes both streams through."""
    torch.manual_seed(0)
    block = JointTransformerBlock(replace(SMALL, qk_norm="rms_norm"), context_pre_only=False, dual=True).eval()
    for norm in (block.norm1, block.norm1_context):
        torch.nn.init.zeros_(norm.linear.weight)
        torch.nn.init.zeros_(norm.linear.bias)
    x, c, emb = torch.randn(2, 12, SMALL.dim), torch.randn(2, 5, SMALL.dim), torch.randn(2, SMALL.dim)
    with torch.no_grad():
        c_out, x_out = block(x, c, emb)
    assert torch.equal(x_out, x) and torch.equal(c_out, c)


# ─── T5 ────────────────────────────────────────────────────────────────────────────────────────────

def reference_t5(cfg: T5Config):
    torch.manual_seed(0)
    return transformers.T5EncoderModel(transformers.T5Config(**cfg.to_transformers())).eval()


def test_t5_matches_transformers():
    cfg = replace(TINY_T5, num_layers=3, relative_attention_max_distance=20)  # 40 tokens reach the log buckets
    ref = reference_t5(cfg)
    ref.load_state_dict(perturbed(ref.state_dict(), seed=3))
    model = ours(T5Encoder, cfg, ref.state_dict())
    assert model.shared is model.encoder.embed_tokens  # tied, as in transformers
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    with torch.no_grad():
        report("T5 encoder", model(ids), ref(ids).last_hidden_state, rtol=1e-4)
        report("T5 encoder, padding masked", model(ids, mask), ref(ids, attention_mask=mask).last_hidden_state,
               rtol=1e-4)


def test_t5_matches_transformers_at_the_xxl_width():
    """T5 v1.1 XXL's widths (d_model 4096, 64 heads of 64, d_ff 10240) in one layer, over a reduced vocabulary."""
    cfg = replace(T5_XXL, num_layers=1, vocab_size=512)
    ref = reference_t5(cfg)
    ref.load_state_dict(perturbed(ref.state_dict(), seed=9))
    model = ours(T5Encoder, cfg, ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        report("T5 encoder, XXL width, 1 layer", model(ids), ref(ids).last_hidden_state, rtol=1e-4)


def test_t5_in_fp16_keeps_wo_in_fp32_as_transformers_does(tmp_path):
    """Loaded in float16, transformers keeps each feed-forward's `wo` in float32 (T5 v1.1 overflows fp16 there);
    minisd's `T5Encoder.to(float16)` does the same, and the outputs agree at fp16's precision."""
    cfg = replace(TINY_T5, num_layers=2)
    ref32 = reference_t5(cfg)
    ref32.load_state_dict(perturbed(ref32.state_dict(), seed=5))
    ref32.save_pretrained(tmp_path)
    ref = transformers.T5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.float16).eval()
    model = ours(T5Encoder, cfg, ref32.state_dict()).to(torch.float16)
    for (name, ours_p), (_, ref_p) in zip(model.named_parameters(), ref.named_parameters()):
        assert ours_p.dtype == ref_p.dtype, name  # wo in float32, everything else in float16
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, expected = model(ids), ref(ids).last_hidden_state
    assert out.dtype == expected.dtype
    report("T5 encoder, fp16 with wo in fp32", out.float(), expected.float(), rtol=4e-3)  # a few fp16 ulps (9.8e-4)


def test_t5_relative_buckets_match_transformers():
    rel = torch.arange(-300, 300)[None, :]
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, True, 32, 128)
    assert torch.equal(relative_position_bucket(rel, 32, 128), theirs)


def test_t5_xxl_names_and_shapes():
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**T5_XXL.to_transformers()))
        model = T5Encoder(T5_XXL)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected, f"missing {sorted(expected.keys() - got.keys())[:5]}, " \
                            f"unexpected {sorted(got.keys() - expected.keys())[:5]}"
    assert T5Config.from_transformers(ref.config.to_dict()) == T5_XXL
    print(f"[shapes] T5-XXL encoder: {len(got)} tensors, {sum(v.numel() for v in model.parameters()) / 1e9:.2f}B "
          f"parameters, all equal to transformers'")


def test_t5_bad_input():
    with pytest.raises(ValueError, match="gated-gelu"):
        T5Config.from_transformers({"model_type": "t5", "feed_forward_proj": "relu"})
    model = T5Encoder(replace(TINY_T5, num_layers=1))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[1, 2]]), torch.ones(1, 3))


# ─── the T5 tokenizer ──────────────────────────────────────────────────────────────────────────────

def build_unigram_tokenizer(folder):
    """A small T5-style tokenizer.json: unigram pieces (with "▁" starting a word), <pad>=0, </s>=1, <unk>=2,
    whitespace split + Metaspace, "$A </s>" (the layout of google/t5-v1_1-xxl's tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    words = ["a", "an", "the", "small", "large", "red", "green", "blue", "circle", "square", "on", "left", "right",
             "of", "photo", "cat"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0 - 0.1 * i) for i, w in enumerate(words)]
    vocab += [(ch, -8.0) for ch in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.save(str(folder / "tokenizer.json"))


def test_t5_tokenizer_matches_transformers(tmp_path):
    build_unigram_tokenizer(tmp_path)
    hf = transformers.T5TokenizerFast.from_pretrained(str(tmp_path), extra_ids=0)
    ours_tok = T5Tokenizer(tmp_path, max_length=12)
    prompts = ["a red circle on the left", "a photo of a  cat", "zebra XYZ", "",
               "a small red square on the left of a large blue circle"]  # the last one is truncated
    theirs = hf(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="truncated"):
        got = ours_tok(prompts)
    assert torch.equal(got, theirs), f"\n{got}\n{theirs}"
    assert ours_tok.decode(got[0]) == ["a red circle on the left"]
    with pytest.raises(ValueError, match="tokenizer.json"):
        T5Tokenizer(tmp_path / "nowhere")


def write_spiece_model(file, vocab, charsmap=b""):
    """A SentencePiece spiece.model (ModelProto in protobuf wire format) from the [(piece, score)] of a
    tokenizer.json: <pad>, </s> CONTROL, <unk> UNKNOWN, the rest NORMAL; a unigram TrainerSpec; a NormalizerSpec
    with T5's flags and, if given, a precompiled_charsmap."""
    import struct

    def varint(n):
        out = b""
        while n > 0x7F:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    def field(number, wire, value):  # wire 0: int varint; 2: bytes, length-delimited; 5: bytes, fixed32
        payload = varint(value) if wire == 0 else varint(len(value)) + value if wire == 2 else value
        return varint(number << 3 | wire) + payload

    types = {"<pad>": 3, "</s>": 3, "<unk>": 2}
    proto = b"".join(field(1, 2, field(1, 2, piece.encode()) + field(2, 5, struct.pack("<f", score))
                                 + field(3, 0, types.get(piece, 1))) for piece, score in vocab)
    proto += field(2, 2, field(3, 0, 1) + field(40, 0, 2))  # TrainerSpec: model_type UNIGRAM, unk_id 2
    spec = field(1, 2, b"nmt_nfkc") + (field(2, 2, charsmap) if charsmap else b"") + field(3, 0, 1) + field(4, 0, 1)
    file.write_bytes(proto + field(3, 2, spec))


def test_t5_tokenizer_reads_spiece_model(tmp_path):
    import json
    (tmp_path / "json").mkdir(), (tmp_path / "spm").mkdir()
    build_unigram_tokenizer(tmp_path / "json")
    vocab = [tuple(v) for v in json.loads((tmp_path / "json" / "tokenizer.json").read_text())["model"]["vocab"]]
    write_spiece_model(tmp_path / "spm" / "spiece.model", vocab)
    hf = transformers.T5TokenizerFast.from_pretrained(str(tmp_path / "json"), extra_ids=0)
    from_json, from_spm = T5Tokenizer(tmp_path / "json", max_length=12), T5Tokenizer(tmp_path / "spm", max_length=12)
    prompts = ["a red circle on the left", "  a photo   of a cat  ", "a\tred\ncat", "a cat, on the left!",
               "zebra XYZ ÿ 猫 🐱", "", " ", "</s> <pad> a cat",
               "a small red square on the left of a large blue circle"]  # the last one is truncated, </s> kept
    theirs = hf(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="truncated"):
        got_json, got_spm = from_json(prompts), from_spm(prompts)
    print(f"[t5 tokenizer] spiece.model vs tokenizer.json: {int((got_spm != got_json).sum())} of "
          f"{got_spm.numel()} ids differ; vs transformers: {int((got_spm != theirs).sum())}")
    assert torch.equal(got_spm, got_json) and torch.equal(got_spm, theirs), f"\n{got_spm}\n{got_json}\n{theirs}"
    assert got_spm[-1, -1] == 1 and from_spm.decode(got_spm[0]) == from_json.decode(got_json[0])
    assert len(from_spm) == len(vocab) + 100  # T5's sentinels follow the pieces: <extra_id_0> is the last id
    assert from_spm("<extra_id_0> cat")[0, 0] == len(vocab) + 99
    write_spiece_model(tmp_path / "json" / "spiece.model", vocab[:3])  # both files: tokenizer.json wins
    assert torch.equal(T5Tokenizer(tmp_path / "json", max_length=12)(prompts[:1]), got_json[:1])
    assert torch.equal(T5Tokenizer(tmp_path / "spm" / "spiece.model", max_length=12)(prompts[:1]), got_spm[:1])


def test_t5_tokenizer_bad_spiece_model(tmp_path):
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0), ("▁cat", -2.0)]
    file = tmp_path / "spiece.model"
    write_spiece_model(file, vocab)
    data = file.read_bytes()
    bad = {"truncated": data[:len(data) // 2], "garbage": b"\xff" * 20, "empty": b"",
           "wire type 7": b"\x0f" + data}
    for name, blob in bad.items():
        file.write_bytes(blob)
        with pytest.raises(ValueError, match="spiece.model is not a readable SentencePiece model") as err:
            T5Tokenizer(tmp_path)
        print(f"[t5 tokenizer] {name}: {str(err.value)[len(str(file)):]}")
    write_spiece_model(file, vocab, charsmap=b"\x10\x00\x00\x00not a trie")
    with pytest.raises(ValueError, match="precompiled_charsmap"):
        T5Tokenizer(tmp_path)
    write_spiece_model(file, [v for v in vocab if v[0] != "</s>"])
    with pytest.raises(ValueError, match="no </s> piece"):
        T5Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json or spiece.model"):
        T5Tokenizer(tmp_path / "nowhere")
