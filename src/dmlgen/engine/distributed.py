"""Multi-process training with ``torch.distributed``, started by ``torchrun`` (docs/distributed.md).

The design makes ``W`` processes with ``B / W`` images each compute the same step as one process with the
global batch of ``B`` images:

- **Sharding.** Every rank draws the same global class-balanced batch (same sampler, same seed) and keeps
  its contiguous ``1 / W`` part, which is whole classes (:func:`dmlgen.data.samplers.shard_batch`); the
  per-image augmentation seeds are those of the global slots.
- **Gather.** Each rank embeds its part; :func:`gather_with_grad` concatenates all ranks' embeddings in rank
  order (= the global batch order) and every rank computes the loss of the whole global batch, so each
  rank's negatives include every other rank's images. Its backward sums the gradient over the ranks
  (every rank's loss depends on every rank's embeddings), so each rank holds ``W x dL/d(its embeddings)``
  and DDP's gradient average over ``W`` ranks gives exactly ``dL/dθ``: no loss scaling is needed.
  Parameters outside the model (a loss's proxies or β, MDR's levels) see the same loss on every rank and so
  the same gradient; :meth:`DistContext.average_gradients` averages them anyway, so GPU non-determinism
  cannot let the replicas drift apart.
- **BatchNorm.** :func:`convert_sync_batchnorm` makes every BatchNorm use the statistics of the global batch:
  torch's SyncBatchNorm on GPUs; on the CPU, which torch's SyncBatchNorm and DDP refuse, :class:`SyncBatchNorm2d`
  & co. (differentiable all-reduces).
- **Evaluation.** :func:`embed_sharded`: each rank embeds a contiguous part of the split, the parts are
  gathered in order, rank 0 scores them and broadcasts the metrics.

Only rank 0 writes files; every rank reads the same ``last.ckpt`` on resume.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dmlgen.engine.logging import RunLogger
from dmlgen.errors import ConfigError, DmlgenError

# engine.setup (datasets, torchvision) is imported where it is used: a process that only needs the collectives
# starts in the time of `import torch`.

# Rank 0 alone computes metrics (k-means and kNN of a large test split can take many minutes) while the other
# ranks wait in a broadcast; torch's default NCCL timeout (10 min) would kill them first.
DEFAULT_TIMEOUT = timedelta(minutes=60)

# Words in the messages of a collective that failed because another process died or hung (gloo, NCCL).
_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
                         "timed out", "timeout", "nccl", "gloo")


class RankFailure(DmlgenError):
    """A collective failed: another process of the job died or hung; the message says how to resume."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. ``world_size == 1`` (the default) is plain single-process training and
    every method is then a no-op that returns its input."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    # Whether dmlgen initialised the process group (and destroys it at exit) or found it initialised.
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for a collective: NCCL works on the rank's GPU, gloo on the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (downloads, caches), the others after it: no two processes write the same
        cache file at once."""
        if self.enabled and not self.is_main:
            dist.barrier()
        yield
        if self.enabled and self.is_main:
            dist.barrier()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """All ranks' ``(n, ...)`` tensors (``n`` the same on every rank) concatenated in rank order; no gradient."""
        if not self.enabled:
            return tensor
        local = tensor.detach().to(self.comm_device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like :meth:`gather`, but the number of rows may differ between ranks (padded for the collective)."""
        if not self.enabled:
            return tensor
        local = tensor.detach().to(self.comm_device).contiguous()
        sizes = [torch.zeros(1, dtype=torch.long, device=self.comm_device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=self.comm_device))
        rows = [int(s.item()) for s in sizes]
        padded = local.new_zeros((max(rows), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, rows)]).to(tensor.device)

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks (one all-reduce), so that every rank takes the same branch."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        values = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in values.tolist())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients of parameters outside DDP (loss and regularizer parameters) over the ranks."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group]).to(self.comm_device)
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for g in group:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()

    @contextmanager
    def rank_rng(self, device: torch.device) -> Iterator[None]:
        """Random draws inside the block (dropout in the forward pass) differ between ranks; afterwards the RNG
        is back to the state shared by all ranks, so that draws on the gathered batch (a random miner) agree."""
        if not self.enabled:
            yield
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # Derived from the shared per-step state, so the rank streams are reproducible (exact resume).
            base = int(torch.randint(0, 2**62, (1,)).item())
            torch.default_generator.manual_seed(base + self.rank)
            if device.type == "cuda":
                torch.cuda.manual_seed(base + self.rank)
            yield


SINGLE_PROCESS = DistContext()


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """The process's :class:`DistContext` and training device (``train.device``).

    Uses an initialised default process group as it is; else, when ``torchrun`` set ``WORLD_SIZE > 1``,
    initialises one from the environment (NCCL for CUDA, gloo for the CPU) and destroys it at exit. Without
    either, single-process training. Under ``W > 1`` processes ``cuda`` / ``auto`` mean the GPU of
    ``LOCAL_RANK``.
    """
    from dmlgen.engine.setup import resolve_device

    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and env_world <= 1:
        return SINGLE_PROCESS, resolve_device(device_name)
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={env_world} asks for distributed training, but this torch build has no "
                          "torch.distributed")
    device = resolve_device(device_name)
    owns = False
    if initialised:
        backend = str(dist.get_backend())
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=DEFAULT_TIMEOUT)
        owns = True
        atexit.register(_destroy_group)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, owns_group=owns)
    if world <= 1:
        return ctx, device
    if device.type == "cuda":
        if ":" in device_name:
            raise ConfigError(
                f"train.device: {device_name!r} names one GPU, but {world} processes train together; use 'cuda' or "
                "'auto' (each process takes the GPU of its LOCAL_RANK)"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {rank} has LOCAL_RANK {local_rank}, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "nccl":
        raise ConfigError(f"train.device: {device_name!r} is the CPU, but the process group uses NCCL (GPUs only); "
                          "initialise it with the gloo backend")
    return ctx, device


def requested_world_size() -> int:
    """The number of processes of this job: the initialised group's, else torchrun's ``WORLD_SIZE`` (1 alone)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one); the CLI prints results only there."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def launch_prefix() -> list[str]:
    """How this process was started, for the resume command: ``torchrun --nproc_per_node=W -m dmlgen.cli`` under
    torchrun on one node, ``dmlgen`` otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return ["dmlgen"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    if local == world:
        return ["torchrun", f"--nproc_per_node={world}", "-m", "dmlgen.cli"]
    return ["torchrun", "<the same launch options>", "-m", "dmlgen.cli"]


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed collective (a dead or hung peer) rather than an error of this process."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


# --------------------------------------------------------------------------- autograd collectives
class _GatherWithGrad(torch.autograd.Function):
    """``cat(all_gather(x))`` whose backward sums the incoming gradient over the ranks and returns this rank's
    rows: the gradient of the sum of every rank's loss, each of which may use every rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], rank
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(x, SUM)``; its gradient is the all-reduced gradient (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group  # None: the default group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``(n, D)`` rows concatenated in rank order, differentiable w.r.t. this rank's ``x``.

    Every rank must pass the same ``n``. Without an initialised group of more than one process: ``x``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


# --------------------------------------------------------------------------- BatchNorm
class _CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of every rank's images, for CPU tensors (gloo), which torch's
    SyncBatchNorm refuses (and DDP refuses SyncBatchNorm on CPU modules).

    Mean and biased variance come from two differentiable all-reduces (the sum, then the sum of squared
    deviations: no cancellation); the running variance gets the unbiased value, as in BatchNorm. Outside
    training, or without a group of several processes, it is the plain BatchNorm it subclasses; parameters,
    buffers and ``state_dict`` keys are unchanged.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        if (not self.training or not (dist.is_available() and dist.is_initialized())
                or dist.get_world_size() == 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in BatchNorm
                factor = 1.0 / float(self.num_batches_tracked.item())
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        count = input.new_tensor([input.numel() // channels])
        total = _AllReduceSum.apply(torch.cat([input.sum(dims), count]), None)
        n = total[channels].detach()
        mean = total[:channels] / n
        centered = input - mean.view(shape)
        var = _AllReduceSum.apply(centered.pow(2).sum(dims), None) / n
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out


class SyncBatchNorm1d(_CpuSyncBatchNorm, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with global batch statistics on CPU (see ``_CpuSyncBatchNorm``)."""


class SyncBatchNorm2d(_CpuSyncBatchNorm, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with global batch statistics on CPU (see ``_CpuSyncBatchNorm``)."""


class SyncBatchNorm3d(_CpuSyncBatchNorm, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with global batch statistics on CPU (see ``_CpuSyncBatchNorm``)."""


_CPU_SYNC = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d, nn.BatchNorm3d: SyncBatchNorm3d}


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` with the batch statistics of all ranks, keeping its parameter and buffer
    objects (an optimiser built before still holds them) and its ``state_dict`` keys: torch's SyncBatchNorm on
    GPUs, :class:`SyncBatchNorm2d` & co. (subclasses of the BatchNorm they replace) on the CPU. BatchNorm frozen
    in eval mode (``model.freeze_bn``) normalises with its running statistics and needs no synchronisation."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        cls = _CPU_SYNC.get(type(module))
        if cls is not None:
            module.__class__ = cls  # same attributes, new forward
    return model


@contextmanager
def defer_batch_scaling(model: nn.Module) -> Iterator[bool]:
    """Yields whether the model's head scales its training output by the mean distance within the batch (MDR's
    "no L2 norm"); if so, the head skips it inside the block, so that the caller can scale the gathered global
    batch (``dmlgen.models.heads.scale_by_mean_distance``) as a single process would."""
    head = getattr(model, "head", None)
    if not getattr(head, "scale_by_mean_distance", False):
        yield False
        return
    assert head is not None
    head.scale_by_mean_distance = False
    try:
        yield True
    finally:
        head.scale_by_mean_distance = True


# --------------------------------------------------------------------------- evaluation
def embed_sharded(model: nn.Module, dataset: Any, ctx: DistContext, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dmlgen.engine.setup.embed_dataset` with each rank embedding a contiguous part of ``dataset``; every
    rank returns all embeddings ``(N, D)`` and labels ``(N,)``, in dataset order. ``kwargs`` go to embed_dataset
    (``should_stop`` is dropped: a rank stopping alone would leave the others waiting)."""
    from dmlgen.engine.setup import embed_dataset

    kwargs.pop("should_stop", None)
    n = len(dataset)
    if not ctx.enabled or n < ctx.world_size:
        return embed_dataset(model, dataset, **kwargs)
    lo, hi = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
    emb, labels = embed_dataset(model, torch.utils.data.Subset(dataset, range(lo, hi)), **kwargs)
    return ctx.gather_rows(emb), ctx.gather_rows(labels)


class NullLogger(RunLogger):
    """The run logger of ranks other than 0: only rank 0 writes ``metrics.jsonl``, ``epochs.csv`` and TensorBoard."""

    def __init__(self) -> None:  # opens nothing
        pass

    def event(self, kind: str, **fields: Any) -> None:
        del kind, fields

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        del prefix, values, step

    def write_epochs(self, rows: list[dict[str, Any]]) -> None:
        del rows

    def close(self) -> None:
        pass


__all__ = [
    "DEFAULT_TIMEOUT",
    "DistContext",
    "NullLogger",
    "RankFailure",
    "SINGLE_PROCESS",
    "SyncBatchNorm1d",
    "SyncBatchNorm2d",
    "SyncBatchNorm3d",
    "convert_sync_batchnorm",
    "defer_batch_scaling",
    "embed_sharded",
    "gather_with_grad",
    "init_distributed",
    "is_main_process",
    "is_peer_failure",
    "launch_prefix",
    "requested_world_size",
]
