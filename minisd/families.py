"""Model families: which networks a checkpoint holds, recognised from its files, and what reads them.

A family is one entry in `FAMILIES`: how to recognise its diffusers folder (model_index.json) and its single
file (its keys), the readers that turn either into its parts by role (text encoders and tokenizers, the
denoiser backbone, the autoencoder, the scheduler config), and whether `StableDiffusion` generates with it.
`StableDiffusion.from_pretrained` asks `family_of_folder` / `family_of_state_dict` first and reads with what
the family names — so a new family (a transformer backbone, a video U-Net) is a new entry and new modules
beside SD 1.x, not flags inside it.

SD 1.x and 2.x are one family (the same classes at other sizes and prediction types). SDXL's networks, its
folders and its single files read exactly (minisd.formats.sdxl, tests/test_sdxl.py), and `from_pretrained`
returns its pipeline, `pipeline_xl.StableDiffusionXL` (tests/test_sdxl_pipeline.py). SD 3's (and the shapes
world's tiny MMDiT's) read with minisd.formats.sd3 and generate with `pipeline_sd3.StableDiffusion3`
(tests/test_sd3_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .formats import sd3, sdxl, weights
from .formats.weights import StateDict, WeightsError
from .models.configs import SDXLConfig


@dataclass(frozen=True)
class Family:
    name: str                                   # short id: "sd1", "sdxl"
    title: str                                  # what error messages call it
    folder_test: Callable[[dict], bool]         # model_index.json -> is this family's folder
    file_test: Callable[[StateDict], bool]      # single-file state dict -> is this family's file
    read_folder: Callable[[Path, str | None], object]
    read_single_file: Callable[..., object]
    generates: bool                             # StableDiffusion can generate with it


def _is_sdxl_index(index: dict) -> bool:
    return "StableDiffusionXL" in str(index.get("_class_name", "")) or "text_encoder_2" in index


def _is_sd3_index(index: dict) -> bool:
    """SD 3's folders (StableDiffusion3Pipeline; checked before SDXL's: they have a text_encoder_2 too), and any
    with a transformer, as SD 3's and the shapes world's tiny MMDiT have."""
    return str(index.get("_class_name", "")).startswith("StableDiffusion3") or "transformer" in index


def _is_sd3_file(sd: StateDict) -> bool:
    return any(k.startswith(sd3.MMDIT_PREFIX + "joint_blocks.") for k in sd)


def _is_sdxl_file(sd: StateDict) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in sd)


def _read_sdxl_file(sd: StateDict, source: str, metadata: dict[str, str]) -> sdxl.SDXLComponents:
    """A single file's networks: the configs minisd saved in its metadata (any size), else SDXL 1.0's presets."""
    saved = metadata.get("minisd_config")
    return sdxl.convert_sdxl_single_file(sd, source, SDXLConfig.from_json(saved) if saved else None)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd3", "SD 3 model", _is_sd3_index, _is_sd3_file, sd3.read_sd3_folder, sd3.convert_sd3_single_file,
           generates=True),
    Family("sdxl", "SDXL model", _is_sdxl_index, _is_sdxl_file, sdxl.read_sdxl_folder, _read_sdxl_file,
           generates=True),
    # checked last: everything that is not another family's is read as SD 1.x/2.x (whose readers say what is wrong)
    Family("sd1", "Stable Diffusion 1.x/2.x model", lambda index: True, lambda sd: True,
           weights.read_diffusers_folder, weights.convert_single_file, generates=True),
)}


def family_of_folder(folder: Path) -> Family:
    index_path = folder / "model_index.json"
    index = weights.read_json(index_path, "model_index.json") if index_path.is_file() else {}
    return next(f for f in FAMILIES.values() if f.folder_test(index))


def family_of_state_dict(sd: StateDict) -> Family:
    return next(f for f in FAMILIES.values() if f.file_test(sd))


def check_generates(family: Family, source: str | Path) -> None:
    if not family.generates:
        raise WeightsError(f"{source} is an {family.title}: its networks read with minisd.formats."
                           f"{family.name} (exact to diffusers), but the pipeline does not generate with "
                           f"{family.title}s yet; minisd generates with Stable Diffusion 1.x and 2.x")
