"""Model families: from_pretrained recognises a checkpoint's family before reading it, and a pipeline holds
its parts by role."""

import json

import pytest
import torch
from safetensors.torch import save_file

from minisd import StableDiffusion, WeightsError, save_single_file
from minisd.families import FAMILIES, family_of_folder, family_of_state_dict
from minisd.formats.weights import read_state_dict
from minisd.pipeline import TINY_PATH


def test_the_tiny_folder_and_its_single_file_are_sd1(tmp_path):
    assert family_of_folder(TINY_PATH).name == "sd1"
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    save_single_file(pipe, tmp_path / "tiny.safetensors")
    assert family_of_state_dict(read_state_dict(tmp_path / "tiny.safetensors")).name == "sd1"


def test_sdxl_is_recognised_by_folder_and_by_keys(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert family_of_folder(tmp_path).name == "sdxl"
    assert family_of_state_dict({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}).name == "sdxl"
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)}, path)
    # read as SDXL (not as SD 1.x): the errors are the SDXL readers'
    with pytest.raises(WeightsError, match="not a complete SDXL single file"):
        StableDiffusion.from_pretrained(path, device="cpu")
    with pytest.raises(WeightsError, match="not an SDXL pipeline"):
        StableDiffusion.from_pretrained(tmp_path, device="cpu")


def test_every_family_names_its_readers():
    for family in FAMILIES.values():
        assert callable(family.read_folder) and callable(family.read_single_file), family.name
    assert [f.name for f in FAMILIES.values()][-1] == "sd1"  # the catch-all is asked last


def test_a_pipeline_holds_its_parts_by_role():
    pipe = StableDiffusion.from_pretrained("tiny", device="cpu")
    assert pipe.backbone is pipe.unet and pipe.autoencoder is pipe.vae
    assert pipe.text_encoders == [pipe.text_encoder] and pipe.tokenizers == [pipe.tokenizer]
