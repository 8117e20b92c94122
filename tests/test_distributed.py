"""Training on several processes (minisd/shapes/dist.py) gives the model that one process gives: a few U-Net,
LoRA, DreamBooth and textual-inversion steps on 1 process and on 2 CPU processes under torchrun (gloo), weights compared;
a checkpoint written by 2 processes resumes on 1; a batch the processes cannot share is refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed

from minisd.cli import main as cli_main
from minisd.shapes.train import main as train_main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch built without torch.distributed (gloo)")

UNET = ["unet", "--n-images", "40", "--unet-steps", "4", "--unet-batch", "8", "--warmup", "1", "--sample-steps", "1",
        "--bf16", "no"]
LORA = ["lora", "--n-images", "24", "--steps", "3", "--batch", "4", "--bf16", "no", "--te-targets", "q_proj,v_proj"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, argv: list[str]) -> None:
    """`torchrun --nproc_per_node n -m minisd train argv` on this machine's CPU, one thread a process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    root = str(Path(__file__).resolve().parents[1])  # this checkout's minisd, in the child processes too
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "minisd", "train", *argv]
    t0 = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"{n} processes: {time.time() - t0:.1f} s")


def compare(name: str, one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> float:
    """‖one − two‖ / ‖one‖ over all the weights together, printed with max |one − two|. The 2 processes sum
    each gradient in another order; where a gradient is rounding noise (a fresh LoRA's A while B is near 0)
    Adam's first steps, ±lr whatever the gradient's size, can go either way: max |diff| reaches one step
    there, while the weights as a whole agree to float32 rounding."""
    assert one.keys() == two.keys()
    diff = max((one[k].double() - two[k].double()).abs().max().item() for k in one)
    num = sum((one[k].double() - two[k].double()).pow(2).sum() for k in one).sqrt().item()
    den = sum(one[k].double().pow(2).sum() for k in one).sqrt().item()
    print(f"[1 vs 2 processes] {name}: max |diff| {diff:.3e}; relative difference ‖diff‖/‖weights‖ {num / den:.3e}")
    return num / den


def test_unet_steps_on_two_processes_match_one_and_resume_on_one(tiny_folder, tmp_path):
    args = [*UNET, "--init-from", str(tiny_folder), "--unet-refine-steps", "0"]
    train_main([*args, "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "m1")])
    torchrun(2, [*args, "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "m2")])
    one, two = (torch.load(tmp_path / w / "unet.pt", weights_only=True) for w in ("w1", "w2"))
    assert one["step"] == two["step"] == 4
    assert compare("U-Net weights after 4 steps", one["model"], two["model"]) < 1e-5
    assert compare("U-Net EMA after 4 steps", one["ema"], two["ema"]) < 1e-5
    assert torch.allclose(one["losses"], two["losses"], rtol=1e-5)  # the logged loss: the whole batch's mean
    log = (tmp_path / "w2" / "log.txt").read_text()
    assert log.count("unet step 0:") == 1 and log.count("config:") == 1  # rank 0 alone logs
    assert (tmp_path / "m2" / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    # the 2-process checkpoint holds nothing per process: it goes on (2 refining steps) on 1 process as the
    # 1-process checkpoint does
    for n in ("1", "2"):
        train_main([*UNET, "--init-from", str(tiny_folder), "--unet-refine-steps", "2", "--force",
                    "--work", str(tmp_path / f"w{n}"), "--out", str(tmp_path / f"m{n}")])
    one, two = (torch.load(tmp_path / w / "unet.pt", weights_only=True) for w in ("w1", "w2"))
    assert one["step"] == two["step"] == 6
    assert compare("U-Net weights, resumed on 1 process for 2 more steps", one["model"], two["model"]) < 1e-5


def test_lora_steps_on_two_processes_match_one(tiny_folder, tmp_path):
    args = [*LORA, "--model", str(tiny_folder)]
    train_main([*args, "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "l1")])
    torchrun(2, [*args, "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "l2")])
    one, two = (torch.load(tmp_path / w / "lora.pt", weights_only=True) for w in ("w1", "w2"))
    assert compare("LoRA weights after 3 steps", one["model"], two["model"]) < 1e-5
    assert torch.allclose(one["losses"], two["losses"], rtol=1e-5)
    assert (tmp_path / "l2" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("kind, extra, checkpoint", [
    ("dreambooth", ["--n-class-images", "4"], "dreambooth.pt"),   # both halves (the star's, the prior's) shared
    ("textual-inversion", ["--num-vectors", "2"], "textual-inversion.pt"),
])
def test_dreambooth_and_textual_inversion_on_two_processes_match_one(kind, extra, checkpoint, tiny_folder, tmp_path):
    args = [kind, "--n-images", "24", "--steps", "3", "--batch", "4", "--bf16", "no", *extra, "--model", str(tiny_folder)]
    train_main([*args, "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "o1")])
    torchrun(2, [*args, "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "o2")])
    one, two = (torch.load(tmp_path / w / checkpoint, weights_only=True) for w in ("w1", "w2"))
    weights = "model" if kind == "dreambooth" else "embedding"
    assert compare(f"{kind} weights after 3 steps", one[weights], two[weights]) < 1e-5
    assert torch.allclose(one["losses"], two["losses"], rtol=1e-5)
    assert (tmp_path / "o2" / "training.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["unet", "--unet-batch", "5"], "--unet-batch 5 does not split among 2 processes"),
    (["lora", "--batch", "3"], "--batch 3 does not split among 2 processes"),
])
def test_a_batch_the_processes_cannot_share_is_refused_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    """Before any work: the check reads WORLD_SIZE, before joining the other processes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["train", *argv, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minisd: error: {message}: batch sizes are global"), err
    assert not torch.distributed.is_initialized()


def test_each_process_takes_its_contiguous_share():
    from minisd.shapes.dist import Dist

    x = torch.arange(12).view(6, 2)
    assert [Dist(r, 3).share(x)[:, 0].tolist() for r in range(3)] == [[0, 2], [4, 6], [8, 10]]
    assert Dist(1, 2).share(list("abcd")) == ["c", "d"]
    assert Dist().share(x) is x  # one process: the batch itself
    with pytest.raises(ValueError, match="a batch of 5 does not split among 2 processes"):
        Dist(0, 2).share(torch.zeros(5))


def test_one_gpu_named_for_every_process_is_refused(monkeypatch):
    from minisd.shapes.dist import Dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"^--device cuda:0 names one GPU for all 2 processes: give --device cuda"):
        Dist.from_env("cuda:0", {"--batch": 4})
