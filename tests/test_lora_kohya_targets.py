"""Which loaders read which layers of the shipped kohya LoRA (docs/adapters.md): kohya sd-scripts' rule,
written on names (minisd/adapters/kohya_targets.py), checked case by case and against kohya's own walk
over the model; diffusers reads every layer; and what the layers kohya drops do to the pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minisd import StableDiffusion
from minisd.adapters.kohya_targets import kohya_dropped, kohya_loads
from minisd.pipeline import DATA
from minisd.shapes import analyser as ev

KOHYA_FILE = DATA / "tiny_star_lora" / "tiny_star_lora_kohya.safetensors"
KOHYA_MODULES = {k.split(".")[0] for k in load_file(KOHYA_FILE)}  # the file's 132 layers

# kohya sd-scripts networks/lora.py (commit 48d368fa), LoRANetwork: the classes whose Linear/Conv2d layers
# get a LoRA when a network is made from a file (UNET_TARGET_REPLACE_MODULE + ..._CONV2D_3X3).
KOHYA_UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")

BLOCK = "lora_unet_down_blocks_1_attentions_0_"
RES = "lora_unet_up_blocks_2_resnets_1_"
TE = "lora_te_text_model_encoder_layers_3_"
CASES = {
    # Transformer2DModel: every Linear/Conv2d below it, in down, mid and up blocks
    BLOCK + "proj_in": True, BLOCK + "proj_out.lora_up.weight": True,
    BLOCK + "transformer_blocks_0_attn1_to_q": True, BLOCK + "transformer_blocks_0_attn2_to_k.alpha": True,
    BLOCK + "transformer_blocks_0_attn2_to_v": True, BLOCK + "transformer_blocks_0_attn1_to_out_0": True,
    BLOCK + "transformer_blocks_0_ff_net_0_proj": True, BLOCK + "transformer_blocks_0_ff_net_2": True,
    "lora_unet_mid_block_attentions_0_proj_in": True, "lora_unet_up_blocks_3_attentions_2_proj_out": True,
    BLOCK + "norm": False,                                     # a GroupNorm, not a Linear or Conv2d
    BLOCK + "transformer_blocks_0_norm1": False,                # a LayerNorm
    # ResnetBlock2D, Downsample2D, Upsample2D
    RES + "conv1": True, RES + "conv2": True, RES + "time_emb_proj": True, RES + "conv_shortcut": True,
    "lora_unet_mid_block_resnets_1_conv2": True, RES + "norm1": False,
    "lora_unet_down_blocks_2_downsamplers_0_conv": True, "lora_unet_up_blocks_0_upsamplers_0_conv": True,
    # CLIPAttention, CLIPMLP
    TE + "self_attn_q_proj": True, TE + "self_attn_out_proj.lora_down.weight": True,
    TE + "mlp_fc1": True, TE + "mlp_fc2": True, TE + "layer_norm1": False,
    "lora_te_text_model_embeddings_token_embedding": False, "lora_te_text_model_final_layer_norm": False,
    # outside every target class
    "lora_unet_conv_in": False, "lora_unet_conv_out.lora_up.weight": False,
    "lora_unet_time_embedding_linear_1": False, "lora_unet_time_embedding_linear_2.alpha": False,
    # names kohya's SD 1.x network never makes: LDM U-Net names, SDXL's two text encoders
    "lora_unet_input_blocks_1_1_proj_in": False, "lora_unet_output_blocks_3_0_in_layers_2": False,
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": False,
}


@pytest.mark.parametrize("key, loaded", list(CASES.items()), ids=list(CASES))
def test_kohya_rule_case_by_case(key, loaded):
    assert kohya_loads(key) is loaded


@pytest.mark.parametrize("key", ["unet.conv_in.lora_A.weight", "text_encoder.fc1.lora_B.weight", ""])
def test_a_key_that_is_not_kohyas_is_refused(key):
    with pytest.raises(ValueError, match="not a kohya LoRA key"):
        kohya_loads(key)


def test_kohya_drops_four_layers_of_the_shipped_file():
    sd = load_file(KOHYA_FILE)
    keys = list(sd)
    assert len(keys) == 3 * len(KOHYA_MODULES) == 3 * 132
    layers = ("conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2")
    expected = sorted(f"lora_unet_{layer}.{part}" for layer in layers for part in ("alpha", "lora_down.weight",
                                                                                   "lora_up.weight"))
    assert kohya_dropped(keys) == expected
    weights = {k: v.numel() for k, v in sd.items() if not k.endswith(".alpha")}
    dropped = sum(n for k, n in weights.items() if not kohya_loads(k))
    print(f"kohya drops {dropped:,} of the LoRA's {sum(weights.values()):,} weights")
    assert 0 < dropped < 0.03 * sum(weights.values())


def kohya_walk(model: torch.nn.Module, prefix: str, classes: tuple[str, ...]) -> set[str]:
    """kohya's create_modules, as written there: every Linear/Conv2d below a module of one of `classes`."""
    names = set()
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


def layer_names(model: torch.nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}.{n}".replace(".", "_") for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.mark.parametrize("layout", ["shipped tiny model", "SD 1.5 block layout"])
def test_the_name_rule_is_kohyas_walk(layout, tiny_folder):
    """On diffusers' U-Net and transformers' CLIP (the classes kohya walks), the names kohya_loads accepts
    are exactly the layers kohya makes a LoRA for."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    folder = DATA / "tiny" if layout == "shipped tiny model" else tiny_folder
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    te = transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    # kohya pins transformers 4.x, whose CLIPTextModel holds the model as `text_model`; 5.x dropped that level
    te_prefix = "lora_te" if hasattr(te, "text_model") else "lora_te.text_model"
    for model, prefix, classes in [(unet, "lora_unet", KOHYA_UNET_CLASSES), (te, te_prefix, KOHYA_TE_CLASSES)]:
        walked = kohya_walk(model, prefix, classes)
        assert walked, f"{layout}: kohya's walk found no {prefix} layers (class names changed?)"
        assert {n for n in layer_names(model, prefix) if kohya_loads(n)} == walked, layout
        if layout == "shipped tiny model" and prefix == "lora_unet":
            assert sorted(KOHYA_MODULES - walked) == ["lora_unet_conv_in", "lora_unet_conv_out",
                                                "lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"]


def test_diffusers_reads_every_layer_of_the_shipped_file():
    """diffusers' kohya converter (_convert_non_diffusers_lora_to_diffusers) maps every key, the four
    layers kohya drops included."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(DATA / "tiny", safety_checker=None,
                                                            requires_safety_checker=False)
    ref.load_lora_weights(KOHYA_FILE, adapter_name="star")
    placed = {"lora_unet_" + n.replace(".", "_") for n, m in ref.unet.named_modules()
              if "star" in getattr(m, "lora_A", {})}
    assert placed == KOHYA_MODULES


def kohya_drop_effect(pipe: StableDiffusion, prompts: list[str], steps: int = 25) -> dict:
    """The shipped kohya LoRA in full and with only the layers kohya sd-scripts loads, on the same noise:
    the analyser's accuracy for each, and the mean |pixel difference| between the two sets (0–255)."""
    full = load_file(KOHYA_FILE)
    kohya_only = {k: v for k, v in full.items() if kohya_loads(k)}
    out, pictures = {}, {}
    for label, sd in [("full", full), ("kohya", kohya_only)]:
        pipe.load_lora(sd, name=label)
        out[f"{label} layers"] = len(pipe.loras[label])
        try:
            pictures[label] = ev.generate_for(pipe, prompts, steps=steps)
        finally:
            pipe.unload_lora(label)
        out[label] = ev.score(prompts, pictures[label])["one"]
    a, b = (np.stack([np.asarray(im, dtype=np.float64) for im in pictures[k]]) for k in ("full", "kohya"))
    out["pixel difference"] = float(np.abs(a - b).mean())
    out["largest pixel difference"] = float(np.abs(a - b).mean(axis=(1, 2, 3)).max())
    return out


@pytest.mark.slow
def test_the_layers_kohya_drops_barely_change_the_stars():
    """20 star prompts (every colour, both sizes, every position), 25 DDIM steps, CFG 7.5, seeds 0–19:
    the numbers quoted in docs/adapters.md."""
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    pipe.progress = False
    res = kohya_drop_effect(pipe, ev.concept_prompts("star")[::3])
    print(res)
    assert res["full layers"] == 132 and res["kohya layers"] == 128
    assert res["full"]["shape"] >= 0.6 and abs(res["full"]["shape"] - res["kohya"]["shape"]) <= 0.1
    assert res["pixel difference"] < 2.0
