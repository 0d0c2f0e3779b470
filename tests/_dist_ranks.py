"""Helpers of tests/test_distributed.py that run inside spawned ranks.

Kept apart from the test module, with dmlgen imported inside the functions, so that a rank which only needs the
collectives starts in the time of ``import torch`` (a loaded 2-core CI machine spends seconds on torchvision).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

SPAWN = mp.get_context("spawn")
WORKER_TIMEOUT = 120  # seconds; a hung collective fails the test instead of hanging CI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def capture_first_step(trainer: Any) -> dict[str, torch.Tensor]:
    """Gradients of every trainable parameter just before the first optimiser step (after DDP's average)."""
    grads: dict[str, torch.Tensor] = {}
    named = [(f"model.{n}", p) for n, p in trainer.model.named_parameters()]
    named += [(f"criterion.{n}", p) for n, p in trainer.criterion.named_parameters()]
    named += [(f"regularizers.{n}", p) for n, p in trainer.regularizers.named_parameters()]

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if not grads:
            grads.update({n: p.grad.detach().clone() for n, p in named if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(hook)
    return grads


def train_and_record(cfg_dict: dict[str, Any], out: Path, resume: bool = False, die_at_step: int | None = None,
                     stop_at_step: int | None = None) -> dict[str, Any]:
    """Train (in this process: alone or as one rank) and return what the tests compare.

    ``die_at_step``: the process exits at once (no cleanup, as when killed) when that global step starts;
    ``stop_at_step``: Ctrl-C / SIGTERM arrives in this process during that global step.
    """
    from dmlgen.engine.config import config_from_dict
    from dmlgen.engine.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    cfg.out_dir = str(out)
    trainer = Trainer(cfg, progress=False, pretrained=not resume, resume_command="RESUME")
    grads = capture_first_step(trainer)
    if die_at_step is not None or stop_at_step is not None:
        original = trainer._train_step

        def step(images: torch.Tensor, labels: torch.Tensor) -> Any:
            if trainer.state.global_step + 1 == die_at_step:
                os._exit(17)
            if trainer.state.global_step + 1 == stop_at_step:
                trainer._guard.requested = True  # what the signal handler does
            return original(images, labels)

        trainer._train_step = step  # type: ignore[method-assign]
    result = trainer.fit(resume=resume, overwrite=not resume)
    return {
        "result": result,
        "history": trainer.state.history,
        "grads": grads,
        "model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "criterion": {k: v.clone() for k, v in trainer.criterion.state_dict().items()},
        "regularizers": {k: v.clone() for k, v in trainer.regularizers.state_dict().items()},
        "world_size": trainer.dist.world_size,
    }


def _rank_main(rank: int, world: int, port: int, target: Callable[..., Any], args: tuple[Any, ...],
               out_file: str) -> None:
    """A spawned rank: join the gloo group, run ``target(*args)``, save its return value or its error to
    ``out_file``; exit 0 on success, 2 on an error."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    code = 0
    try:
        torch.save({"value": target(*args)}, out_file)
    except Exception as exc:  # reported to the test through the file
        torch.save({"error": f"{type(exc).__name__}: {exc}"}, out_file)
        code = 2
    finally:
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(code)


def run_ranks(tmp: Path, target: Callable[..., Any], args: tuple[Any, ...], world: int = 2) -> list[dict[str, Any]]:
    """``target(*args)`` in ``world`` spawned gloo ranks; per rank ``{"exitcode", "value" or "error"}``."""
    port = free_port()
    files = [tmp / f"rank{r}.pt" for r in range(world)]
    for f in files:
        f.unlink(missing_ok=True)
    procs = [SPAWN.Process(target=_rank_main, args=(r, world, port, target, args, str(files[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(WORKER_TIMEOUT)
    for p in procs:
        if p.is_alive():  # a hang: fail rather than block CI
            p.kill()
            p.join()
            pytest.fail(f"a rank did not finish within {WORKER_TIMEOUT} s")
    out = []
    for p, f in zip(procs, files):
        record: dict[str, Any] = {"exitcode": p.exitcode}
        if f.exists():
            record.update(torch.load(f, weights_only=False))  # written by the rank above: results, not weights
        out.append(record)
    return out


def collectives_case() -> dict[str, Any]:
    """Per rank: gather_with_grad and SyncBatchNorm on this rank's half of fixed data (see the test)."""
    from torch import nn

    from dmlgen.engine.distributed import DistContext, convert_sync_batchnorm, gather_with_grad

    rank = torch.distributed.get_rank()
    ctx = DistContext(rank=rank, world_size=2, backend="gloo")
    x, weight = collectives_data()
    local = x[rank * 3: (rank + 1) * 3].clone().requires_grad_(True)
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), torch.device("cpu"))
    assert type(bn[0]).__name__ == "SyncBatchNorm2d" and isinstance(bn[0], nn.BatchNorm2d)
    out = gather_with_grad(bn(local).mean(dim=(2, 3)))
    loss = (out * weight).pow(2).sum()  # the global loss, the same on both ranks
    loss.backward()
    # bn's parameters are replicated without DDP here: their per-rank gradients are averaged by hand.
    ctx.average_gradients(list(bn.parameters()))
    return {"loss": loss.detach(), "x_grad": local.grad, "bn_grad": [p.grad for p in bn.parameters()],
            "running": [bn[0].running_mean.clone(), bn[0].running_var.clone()], "rows": ctx.gather_rows(
                torch.arange(rank + 2)), "any": ctx.any(rank == 1, False)}


def collectives_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, 3, 3, generator=gen) * 2 + 1, torch.randn(6, 2, generator=gen)


def on_rank1(cfg: dict[str, Any], out: Path, resume: bool, event: str, step: int) -> dict[str, Any]:
    """:func:`train_and_record` where only rank 1 meets ``event`` (``die`` or ``stop``) at global ``step``."""
    rank = torch.distributed.get_rank()
    kwargs = {f"{event}_at_step": step} if rank == 1 else {}
    return train_and_record(cfg, out, resume, **kwargs)
