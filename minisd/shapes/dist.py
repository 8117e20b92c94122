"""Training on several processes (`torchrun`, `accelerate launch`): data parallel, giving the model that
one process gives.

Every loop draws each global batch exactly as it does on one process — the same generators drawing the
same numbers on every process (indices, noise, timesteps, dropped captions) — and then each of the N
processes keeps its contiguous share, rows [r·B/N, (r+1)·B/N). A process's loss is the mean over its
share; the gradients are averaged over the processes (one all-reduce), which gives every process the
gradient of the whole batch's mean loss, so every process takes the step that one process takes (up to
the order of floating-point sums), and the weights, the EMA and the optimiser's state stay the same on all.
Rank 0 alone writes files and logs and shows progress.

    dist = Dist.from_env(cfg.device, {"--batch": cfg.batch})   # WORLD_SIZE unset: one process, no-ops
    z0, t = dist.share(z0), dist.share(t)                       # (B, ...) -> (B/N, ...)
    optimiser_step(loss, opt, params, dist=dist)                # backward, average_gradients, clip, step
    losses.append(dist.all_mean(loss).item())                   # the whole batch's mean loss

torchrun and `accelerate launch` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the
processes talk over gloo on the CPU, NCCL on CUDA, one GPU each (cuda:LOCAL_RANK, made the current device,
so `--device cuda` means each process's own GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0   # this process, 0 .. world − 1
    world: int = 1  # N, the number of processes; 1: every method below is a no-op

    @classmethod
    def from_env(cls, device: str | torch.device, batches: dict[str, int] | None = None) -> Dist:
        """The processes torchrun (or accelerate) started, from its environment variables; one process
        when WORLD_SIZE is unset or 1. `batches` ({flag: global batch}) must each split evenly among the
        processes: a ValueError naming the flag otherwise, before any work. Joins the process group (once)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        for flag, batch in (batches or {}).items():
            if batch % world:
                raise ValueError(f"{flag} {batch} does not split among {world} processes: batch sizes are global, "
                                 f"each process takes an equal share; give a multiple of {world}")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device)
        if device.type == "cuda":
            if device.index is not None:
                raise ValueError(f"--device {device} names one GPU for all {world} processes: give --device cuda "
                                 f"(each process then takes its own, cuda:LOCAL_RANK)")
            torch.cuda.set_device(local_rank)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows progress."""
        return self.rank == 0

    def share(self, x):
        """This process's contiguous share of a global batch (a tensor's first dimension, or a list)."""
        if self.world == 1:
            return x
        n = len(x) // self.world
        if n * self.world != len(x):
            raise ValueError(f"a batch of {len(x)} does not split among {self.world} processes")
        return x[self.rank * n:(self.rank + 1) * n]

    def average_gradients(self, params) -> None:
        """p.grad ← mean over the processes of p.grad, for every parameter with a gradient (the same ones on
        every process: the same graph), in one all-reduce per dtype."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        for dtype in {g.dtype for g in grads}:
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            tdist.all_reduce(flat)
            flat /= self.world
            for g, avg in zip(same, flat.split([g.numel() for g in same])):
                g.copy_(avg.view_as(g))

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of a per-process mean (equal shares: the whole batch's mean); no
        gradient. One process: `x` itself."""
        if self.world == 1:
            return x
        y = x.detach().clone()
        tdist.all_reduce(y)
        return y / self.world

    def same(self, module: torch.nn.Module) -> None:
        """Every weight and buffer of `module` set to rank 0's, for what each process computes alone."""
        if self.world > 1:
            for tensor in module.state_dict().values():
                tdist.broadcast(tensor, 0)

    def same_value(self, x: float) -> float:
        """Rank 0's value of a number each process computed alone."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=_comm_device())
        tdist.broadcast(t, 0)
        return float(t)

    def barrier(self) -> None:
        """Wait until every process is here (after rank 0 has written what the others read)."""
        if self.world > 1:
            tdist.barrier()


def _comm_device() -> torch.device:
    """Where the process group's tensors live: the current GPU for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def end() -> None:
    """Leave the process group, if this process joined one (at the end of `minisd train`)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


SINGLE = Dist()  # one process: what a loop uses when no Dist is given
