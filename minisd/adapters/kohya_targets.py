"""Which layers of an SD 1.x kohya LoRA file kohya's own loader applies, and which it leaves out.

kohya sd-scripts (https://github.com/kohya-ss/sd-scripts, `networks/lora.py` at commit
48d368fa557731ad0488c07304dfeba8c07910eb, `create_network_from_weights` → `LoRANetwork.__init__` →
`create_modules`) does not read a file's names: it walks the model and makes a LoRA module only for
each `Linear` and `Conv2d` found *below* a module of one of these classes

    U-Net          Transformer2DModel                         UNET_TARGET_REPLACE_MODULE
                   ResnetBlock2D, Downsample2D, Upsample2D    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 (added
                                                              whenever the network is made from a file)
    text encoder   CLIPAttention, CLIPSdpaAttention, CLIPMLP  TEXT_ENCODER_TARGET_REPLACE_MODULE

named `"lora_unet" | "lora_te"` + path, every "." turned into "_". The file is then loaded into that
network with unexpected keys ignored (gen_img.py: `network.load_state_dict(weights_sd, False)`; `merge_to`
copies only the keys of modules it made), so weights for any other layer are dropped without an error.
kohya's SD 1.x U-Net (`library/original_unet.py`) keeps diffusers' module names, so the rules below are
written on those names:

    Transformer2DModel  (down_blocks_i | up_blocks_i | mid_block)_attentions_j_
                        proj_in, proj_out, transformer_blocks_k_attn{1,2}_to_{q,k,v,out_0},
                        transformer_blocks_k_ff_net_0_proj, transformer_blocks_k_ff_net_2
    ResnetBlock2D       (down_blocks_i | up_blocks_i | mid_block)_resnets_j_
                        conv1, conv2, time_emb_proj, conv_shortcut
    Downsample2D        down_blocks_i_downsamplers_0_conv
    Upsample2D          up_blocks_i_upsamplers_0_conv
    CLIPAttention       text_model_encoder_layers_i_self_attn_{q,k,v,out}_proj
    CLIPMLP             text_model_encoder_layers_i_mlp_fc{1,2}

Left out: the U-Net's `conv_in`, `conv_out` and `time_embedding_linear_{1,2}` (no target class above
them), LDM-named keys (`lora_unet_input_blocks_…`: kohya converts those for SDXL only), and SDXL's
`lora_te1_`/`lora_te2_` text encoders (an SD 1.x network has one, `lora_te`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_BLOCK = r"(?:down_blocks_\d+|up_blocks_\d+|mid_block)"
# Each rule: one target class of kohya's, as the names of the Linear/Conv2d layers below it.
KOHYA_RULES = {
    "Transformer2DModel": rf"lora_unet_{_BLOCK}_attentions_\d+_(?:proj_in|proj_out|transformer_blocks_\d+_"
                          r"(?:attn[12]_to_(?:q|k|v|out_0)|ff_net_0_proj|ff_net_2))",
    "ResnetBlock2D": rf"lora_unet_{_BLOCK}_resnets_\d+_(?:conv1|conv2|time_emb_proj|conv_shortcut)",
    "Downsample2D": r"lora_unet_down_blocks_\d+_downsamplers_0_conv",
    "Upsample2D": r"lora_unet_up_blocks_\d+_upsamplers_0_conv",
    "CLIPAttention": r"lora_te_text_model_encoder_layers_\d+_self_attn_(?:q|k|v|out)_proj",
    "CLIPMLP": r"lora_te_text_model_encoder_layers_\d+_mlp_fc[12]",
}
_KOHYA = re.compile("|".join(f"(?:{rule})" for rule in KOHYA_RULES.values()))


def kohya_module(key: str) -> str:
    """The module name of a kohya key: `lora_unet_conv_in.lora_down.weight` -> `lora_unet_conv_in`."""
    name = key.split(".")[0]
    if not name.startswith(("lora_unet_", "lora_te")):
        raise ValueError(f"{key!r} is not a kohya LoRA key; expected a name starting with lora_unet_ or lora_te_")
    return name


def kohya_loads(key: str) -> bool:
    """Whether kohya sd-scripts' SD 1.x loader applies this key (a module name or a full key) or drops it."""
    return _KOHYA.fullmatch(kohya_module(key)) is not None


def kohya_dropped(keys: Iterable[str]) -> list[str]:
    """The keys of a kohya file that kohya sd-scripts' SD 1.x loader leaves out, sorted."""
    return sorted(k for k in keys if not kohya_loads(k))
