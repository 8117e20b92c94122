"""The command line: reproducible metadata (A1111's parameters, read back with --from), pictures
written without losing anything, and careless input refused with one line and exit status 2.

Generation runs use the shipped tiny model at 16 px (4×4 latents) and 2 steps: the settings and the
bytes are what is tested, not the pictures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from minisd import cli

ROOT = Path(__file__).resolve().parent.parent
LORA = ROOT / "data" / "tiny_star_lora" / "tiny_star_lora_kohya.safetensors"
FAST = ["--steps", "2", "--size", "16", "--quiet"]


def run(argv: list[str]) -> int:
    """cli.main, in this process; argparse's own exits (minisd eval's parser) count too."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def parameters(path: Path) -> dict[str, str]:
    prompt, negative, fields = cli.parse_parameters(cli.read_parameters(path))
    return {"prompt": prompt, "negative": negative, **fields}


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ─── reproducible metadata ──────────────────────────────────────────────────────────────────────

def test_batch_seeds_each_regenerate_their_file(tmp_path):
    out = tmp_path / "b.png"
    assert run(["generate", "a red circle on the left", "-n", "3", "--seed", "5", "--out", out, *FAST]) == 0
    assert [parameters(tmp_path / f"b-{i}.png")["Seed"] for i in (1, 2, 3)] == ["5", "6", "7"]
    grid = parameters(out)
    assert grid["Seed"] == "5" and grid["Batch size"] == "3"
    for i in (1, 2, 3):  # the recorded seed alone makes the same file, byte for byte
        again = tmp_path / f"again-{i}.png"
        assert run(["generate", "--from", tmp_path / f"b-{i}.png", "--out", again, "--quiet"]) == 0
        assert again.read_bytes() == (tmp_path / f"b-{i}.png").read_bytes()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_every_format_records_every_setting_and_reruns_byte_identically(tmp_path, suffix):
    out = tmp_path / f"p{suffix}"
    assert run(["generate", "a blue square, at the top: big", "--negative", "a red circle", "--seed", "11",
                "--steps", "3", "--width", "16", "--height", "24", "--cfg", "5.5", "--clip-skip", "1",
                "--eta", "0.5", "--out", out, "--quiet"]) == 0
    p = parameters(out)
    assert p["prompt"] == "a blue square, at the top: big" and p["negative"] == "a red circle"
    assert {k: p[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Clip skip", "Eta DDIM")} == \
        {"Steps": "3", "Sampler": "DDIM", "CFG scale": "5.5", "Seed": "11", "Size": "16x24", "Model": "tiny",
         "Clip skip": "2", "Eta DDIM": "0.5"}  # A1111's Clip skip 2 = one layer skipped
    assert Image.open(out).format == {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[suffix]
    again = tmp_path / f"again{suffix}"
    assert run(["generate", "--from", out, "--out", again, "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_sd_parsers_reads_the_metadata(tmp_path, suffix):
    sd_parsers = pytest.importorskip("sd_parsers")
    image = Image.new("RGB", (16, 16))
    text = ("a red circle\nNegative prompt: blue\nSteps: 2, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, "
            "Seed: 3, Size: 16x16, Model: tiny, Version: minisd 0.1.0")
    cli.save_picture(image, tmp_path / f"p{suffix}", cli.FORMATS[suffix], text)
    info = sd_parsers.ParserManager().parse(tmp_path / f"p{suffix}")
    sampler = info.samplers[0]
    assert info.generator.name == "AUTOMATIC1111" and sampler.name == "Euler a"
    assert sampler.parameters["scheduler"] == "Karras" and sampler.parameters["seed"] == "3"
    assert [p.value for p in sampler.prompts] == ["a red circle"]
    assert [p.value for p in sampler.negative_prompts] == ["blue"]
    assert sampler.model.name == "tiny"


def test_karras_and_lora_are_recorded_and_rerun(tmp_path):
    out = tmp_path / "k.png"
    assert run(["generate", "a star", "--sampler", "euler_a", "--karras", "--lora", f"{LORA}:0.8", "--seed", "2",
                "--out", out, *FAST]) == 0
    p = parameters(out)
    assert p["prompt"] == "a star <lora:tiny_star_lora_kohya:0.8>"
    assert p["Sampler"] == "Euler a" and p["Schedule type"] == "Karras"
    assert p["Lora hashes"] == f"tiny_star_lora_kohya: {cli.lora_hash(str(LORA))}"
    again = tmp_path / "again.png"  # the LoRA's path, its scale from the picture
    assert run(["generate", "--from", out, "--lora", LORA, "--out", again, "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_img2img_records_strength_and_reruns(tmp_path):
    image, out = tmp_path / "in.png", tmp_path / "i.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
    assert run(["img2img", "a red circle", "--image", image, "--strength", "0.6", "--seed", "4", "--steps", "4",
                "--out", out, "--quiet"]) == 0
    assert parameters(out)["Denoising strength"] == "0.6"
    again = tmp_path / "again.png"
    assert run(["img2img", "--from", out, "--image", image, "--out", again, "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_seed_minus_one_draws_and_records_a_seed_and_flags_override(tmp_path):
    out = tmp_path / "r.png"
    assert run(["generate", "a green triangle", "--seed", "-1", "--out", out, *FAST]) == 0
    seed = int(parameters(out)["Seed"])
    assert 0 <= seed < 2**32
    again = tmp_path / "again.png"
    assert run(["generate", "--from", out, "--steps", "3", "--out", again, "--quiet"]) == 0
    p = parameters(again)
    assert p["Steps"] == "3" and p["Seed"] == str(seed) and p["prompt"] == "a green triangle"


def test_out_dash_writes_the_png_to_stdout(tmp_path, capsysbinary, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["generate", "a red circle", "--seed", "1", "--out", "-", *FAST]) == 0
    captured = capsysbinary.readouterr()
    assert captured.out.startswith(b"\x89PNG") and b"saved" not in captured.out
    assert b"standard output" in captured.err
    (tmp_path / "stdout.png").write_bytes(captured.out)
    assert parameters(tmp_path / "stdout.png")["Seed"] == "1"
    assert list(tmp_path.iterdir()) == [tmp_path / "stdout.png"]  # nothing else written


def test_parameters_text_parses_as_a1111_writes_it():
    text = ('a cat\non two lines <lora:star:0.5>\nNegative prompt: dog, "bad"\n'
            'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model: sd15, '
            'Lora hashes: "star: 0123456789ab, moon: ba9876543210", Hires upscale: 2')
    prompt, negative, fields = cli.parse_parameters(text)
    assert prompt == "a cat\non two lines <lora:star:0.5>" and negative == 'dog, "bad"'
    assert fields["Lora hashes"] == "star: 0123456789ab, moon: ba9876543210" and fields["Size"] == "512x768"
    assert cli._sampler_from("p", fields["Sampler"], "Automatic") == {"sampler": "dpmpp_2m", "karras": True}
    assert cli.parse_parameters("just a prompt") == ("just a prompt", None, {})


# ─── nothing lost ───────────────────────────────────────────────────────────────────────────────

def test_siblings_minisd_did_not_make_need_force(tmp_path):
    out, mine = tmp_path / "s.png", tmp_path / "s-2.png"
    Image.new("RGB", (8, 8)).save(mine)
    argv = ["generate", "x", "-n", "2", "--seed", "1", "--out", out, *FAST]
    assert run(argv) == 2 and not out.exists()
    assert run(argv + ["--force"]) == 0 and parameters(mine)["Seed"] == "2"
    assert run(argv) == 0  # minisd's own pictures from before: overwritten


def test_a_symlink_is_replaced_not_followed(tmp_path):
    target, link = tmp_path / "precious.png", tmp_path / "link.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(target)
    before = target.read_bytes()
    link.symlink_to(target)
    assert run(["generate", "x", "--seed", "1", "--out", link, *FAST]) == 0
    assert not link.is_symlink() and parameters(link)["Seed"] == "1"
    assert target.read_bytes() == before


def test_python_dash_m_minisd_is_minisd(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minisd", "generate", "x", "--steps", "0"], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("minisd: error: ")


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="--steps"):
        cli.main(["generate", "x", "--steps", "0", "--debug"])


# ─── careless input: exit 2, one line, no traceback, no file ─────────────────────────────────────

def _picture(path: Path, text: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (16, 16)).save(path, "PNG", pnginfo=info)


SETTINGS = "Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 16x16, Model: tiny"

CARELESS = [
    (["generate", "x", "--sampler", "nope"], "known samplers"),
    (["generate", "x", "--steps", "0"], "--steps"),
    (["generate", "x", "--steps", "-3"], "--steps"),
    (["generate", "x", "--steps", "ten"], "expected a whole number"),
    (["generate", "x", "--steps", "1001"], "at most 999"),
    (["generate", "x", "--steps", "1001", "--sampler", "ddpm"], "at most 999"),
    (["generate", "x", "--steps", "1001", "--sampler", "pndm"], "at most 999"),
    (["generate", "x", "--size", "0"], "multiples of 8"),
    (["generate", "x", "--size", "60"], "multiples of 8"),
    (["generate", "x", "--size", "8192"], "from 8 to 4096"),
    (["generate", "x", "--width", "63"], "--width"),
    (["generate", "x", "--height", "-8"], "--height"),
    (["generate", "x", "--seed", str(2**63)], "--seed"),
    (["generate", "x", "--seed", "-2"], "--seed"),
    (["generate", "x", "--seed", str(2**63 - 1), "-n", "2"], "largest seed"),
    (["generate", "x", "--cfg", "nan"], "--cfg"),
    (["generate", "x", "--cfg", "inf"], "--cfg"),
    (["generate", "x", "--cfg", "-1"], "--cfg"),
    (["generate", "x", "--eta", "nan"], "--eta"),
    (["generate", "x", "--eta", "-0.5"], "--eta"),
    (["generate", "x", "--eta", "2"], "--eta"),
    (["generate", "x", "--eta", "0.5", "--sampler", "euler"], "DDIM's stochasticity"),
    (["generate", "x", "--karras"], "--karras"),
    (["generate", "x", "-n", "0"], "--num-images"),
    (["generate", "x", "--clip-skip", "-1"], "--clip-skip"),
    (["generate", "x", "--clip-skip", "99"], "clip_skip"),
    (["generate", "x", "--device", "foo"], "unknown device"),
    (["generate", "x", "--device", "cuda:99"], "cuda:99"),
    (["generate", "x", "--device", "meta"], "cpu, cuda or mps"),
    (["generate", "x", "--out", "DIR"], "is a folder"),
    (["generate", "x", "--out", "DIR/"], "is a folder"),
    (["generate", "x", "--out", "FILE/x.png"], "is a file, not a folder"),
    (["generate", "x", "--out", "x.gif"], "expected a name ending in"),
    (["generate", "x", "--out", "x"], "expected a name ending in"),
    (["generate", "x", "-n", "2", "--out", "mine.png"], "minisd did not make it"),
    (["generate", "x", "-n", "2", "--out", "-"], "standard output"),
    (["generate", "x", "--model", "/no/model"], "neither a file"),
    (["generate", "x", "--lora", "/no/lora.safetensors"], "--lora file or folder not found"),
    (["generate", "x", "--lora", "FILE:abc"], "scale"),
    (["generate", "x", "--lora", f"{LORA}:nan"], "scale"),
    (["generate", "x", "--controlnet", "DIR"], "go together"),
    (["generate", "x", "--control-image", "IMG"], "go together"),
    (["generate", "x", "--canny"], "--canny"),
    (["generate", "x", "--controlnet-scale", "-1"], "--controlnet-scale"),
    (["generate", "--from", "/no/such.png"], "--from file not found"),
    (["generate", "--from", "FILE"], "not a picture"),
    (["generate", "--from", "IMG"], "carries no generation parameters"),
    (["generate", "--from", "STEPS0"], "Steps"),
    (["generate", "--from", "SDE"], "sampler 'DPM++ SDE'"),
    (["generate", "--from", "EXPONENTIAL"], "schedule type 'Exponential'"),
    (["generate", "--from", "I2I"], "minisd img2img --from"),
    (["generate", "--from", "LORATAG"], "--lora PATH"),
    (["generate", "--from", "CONTROLNET"], "--controlnet PATH"),
    (["generate"], "give a prompt"),
    (["generate", "a red \udcff circle"], "prompt is not valid UTF-8"),
    (["generate", "x", "--negative", "\udce9t\udce9"], "negative is not valid UTF-8"),
    (["generate", "a star <lora:star:1>"], "--lora PATH"),
    (["generate", "x", "--bogus"], "unrecognized arguments"),
    (["img2img", "x", "--image", "/no/such.png"], "not found"),
    (["img2img", "x", "--image", "FILE"], "not a picture"),
    (["img2img", "x", "--image", "IMG", "--strength", "2"], "--strength"),
    (["img2img", "x", "--image", "IMG", "--strength", "nan"], "--strength"),
    (["img2img", "x", "--image", "IMG", "--strength", "0.01", "--steps", "2"], "leaves no step"),
    (["inpaint", "x", "--image", "IMG", "--mask", "SMALLMASK"], "mask_image is 8x8"),
    (["inpaint", "x", "--image", "IMG"], "--mask"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--batch", "0"], "--batch"),
    (["bench", "--steps", "0"], "--steps"),
    (["paint", "x"], "invalid choice"),
    ([], "required"),
    (["eval", "--steps", "0"], "--steps"),
    (["eval", "--model", "/no/model"], "neither a file"),
    (["eval", "--cfg", "nan"], "--cfg"),
    (["eval", "--sampler", "nope"], "known samplers"),
    (["eval", "--concept", "blob"], "--concept"),
    (["eval", "--control", "depth"], "--control"),
    (["eval", "--vae", "--breakdown"], "separate evaluations"),
    (["eval", "--lora", "/no/lora"], "--lora not found"),
    (["eval", "--draws", "0"], "--draws"),
    (["eval", "--json", "DIR"], "--json"),
    (["eval", "--device", "foo"], "--device"),
]


@pytest.mark.parametrize("argv,message", CARELESS, ids=[" ".join(a)[:60] for a, _ in CARELESS])
def test_careless_input_is_one_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    (tmp_path / "FILE").write_text("not a picture")
    Image.new("RGB", (16, 16)).save(tmp_path / "IMG", "PNG")
    Image.new("L", (8, 8)).save(tmp_path / "SMALLMASK", "PNG")
    Image.new("RGB", (16, 16)).save(tmp_path / "mine-1.png")
    _picture(tmp_path / "STEPS0", f"x\n{SETTINGS.replace('Steps: 2', 'Steps: 0')}")
    _picture(tmp_path / "SDE", f"x\n{SETTINGS.replace('DDIM', 'DPM++ SDE')}")
    _picture(tmp_path / "EXPONENTIAL", f"x\n{SETTINGS}, Schedule type: Exponential")
    _picture(tmp_path / "I2I", f"x\n{SETTINGS}, Denoising strength: 0.5")
    _picture(tmp_path / "LORATAG", f"x <lora:star:0.8>\n{SETTINGS}")
    _picture(tmp_path / "CONTROLNET", f'x\n{SETTINGS}, ControlNet 0: "Module: none, Model: edges, Weight: 1"')
    before = files(tmp_path)
    quick = [] if argv[:1] in (["eval"], ["bench"], []) or "--steps" in argv else ["--steps", "2"]
    assert run(argv + quick + (["--quiet"] if argv[:1] in (["generate"], ["img2img"], ["inpaint"]) else [])) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert files(tmp_path) == before


def test_an_embedding_adds_its_token_and_an_unknown_token_is_refused(tmp_path, capsys):
    embedding = ROOT / "data" / "tiny_star_embedding"
    with_token, plain = tmp_path / "t.png", tmp_path / "p.png"
    assert run(["generate", "a red <star>", "--embedding", embedding, "--seed", "1", "--out", with_token, *FAST]) == 0
    assert run(["generate", "a red star", "--seed", "1", "--out", plain, *FAST]) == 0
    assert with_token.read_bytes() != plain.read_bytes()  # the learnt vector, not the word "star"
    a1111 = tmp_path / "a.png"  # the same vector from the A1111 file
    assert run(["generate", "a red <star>", "--embedding", embedding / "tiny_star_embedding.pt", "--seed", "1",
                "--out", a1111, *FAST]) == 0
    assert Image.open(a1111).tobytes() == Image.open(with_token).tobytes()
    capsys.readouterr()
    assert run(["generate", "a red <star>", "--out", tmp_path / "x.png", *FAST]) == 2
    assert capsys.readouterr().err.strip() == \
        "minisd: error: the prompt names <star>, which no --embedding added (loaded: none)"
    assert run(["generate", "a red <star>", "--embedding", tmp_path / "none", "--out", tmp_path / "y.png", *FAST]) == 2
    assert f"--embedding file or folder not found: {tmp_path / 'none'}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
