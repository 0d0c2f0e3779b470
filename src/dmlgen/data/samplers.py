"""Batch samplers (methods.md §2.1): they decide which images form a batch; datasets keep no state."""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Sampler

from dmlgen.errors import CheckpointError, ConfigError, DataError

__all__ = ["ClassBalancedBatchSampler", "ShardedBatchSampler", "shard_batch"]

_STATE_VERSION = 1


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit seed for (seed, epoch) with no collisions between nearby pairs (unlike seed + epoch)."""
    state = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _max_full_batches(chunks_per_class: np.ndarray, p: int) -> int:
    """Largest B with sum_c min(k_c, B) >= P*B: the most batches of P distinct classes the chunks allow.

    g(B) = sum_c min(k_c, B) - P*B is concave with g(0) = 0, so the feasible B form an interval [0, B*].
    """
    lo, hi = 0, int(chunks_per_class.sum()) // p
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(chunks_per_class, mid).sum() >= p * mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``P = classes_per_batch`` distinct classes x ``m = samples_per_class`` images each.

    Use it as a DataLoader ``batch_sampler``. Every epoch is a fixed function of ``(seed, epoch)``
    (a private ``torch.Generator``, never the global RNG):

    1. **Chunks.** Each class's images are shuffled and cut into chunks of ``m``. When a class's size
       ``n`` is not a multiple of ``m``, its last chunk is **topped up by repeating images of the same
       class**: the first images of its shuffled order (so the chunk holds ``m`` distinct images when
       ``n >= m``), or the class's images cycled when ``n < m``. :attr:`num_repeated` counts these
       top-up slots per epoch (``sum_c ceil(n_c / m) * m - N``). Apart from top-ups every image is
       in exactly one chunk.
    2. **Batches.** The chunks are shuffled and taken greedily in that order, a chunk being passed
       over while its class is already in the batch being filled. Greedy alone can paint itself
       into a corner (the last batches short of distinct classes), so a deterministic rule comes
       first: with ``R`` batches still to fill, a class holding ``>= R`` chunks is *saturated*, and
       enough saturated classes (earliest in the shuffled order first) are put in the batch to keep
       ``sum_c min(chunks_c, R) >= P * R``. That is the exact condition for the remaining ``R``
       batches to exist, so every epoch has exactly ``B* = max{B : sum_c min(k_c, B) >= P*B}`` full
       batches (``k_c`` = chunks of class ``c``) and no batch repeats a class. In a batch, the
       ``m`` images of a chunk are adjacent.
    3. **Leftover chunks** (fewer than ``P`` when no class dominates the data set):
       ``drop_last=True`` (default) leaves them out of this epoch; their images (``epoch_stats()``
       counts them) are unseen this epoch only, as the shuffle differs every epoch.
       ``drop_last=False`` adds ``max(ceil(K / P), max_c k_c) - B*`` smaller final batches, still of
       distinct classes, so every image appears at least once per epoch.

    ``len(sampler)`` is the number of batches of a full epoch, the same for every epoch.

    Resuming: :meth:`state_dict` holds ``seed``, ``epoch`` and ``position`` (batches handed out in
    this epoch); after :meth:`load_state_dict`, iteration continues with the identical remaining
    batches. A DataLoader with workers pre-fetches batches, so ``position`` can run ahead of the
    batches actually trained on; a trainer that counts its steps passes them with
    ``set_epoch(epoch, start_batch=steps)``. The sampler runs in the main process, so it is correct
    with any ``num_workers``.

    Args:
        labels: ``(N,)`` class of each dataset image (ints or strings); batches hold indices into it.
        classes_per_batch: ``P >= 2``.
        samples_per_class: ``m >= 1``; a full batch has ``P * m`` indices.
        seed: base seed; epoch ``e`` uses a seed derived from ``(seed, e)``.
        drop_last: see 3. above (``K`` = total number of chunks).

    Errors and warnings: ``classes_per_batch < 2`` or ``samples_per_class < 1`` (ConfigError), fewer
    than ``P`` classes in ``labels`` (DataError). A class with a single image when ``m > 1`` only
    warns: it stays usable, its chunk being that image repeated ``m`` times (its positive pairs are
    then an image with itself).
    """

    def __init__(
        self,
        labels: Any,
        classes_per_batch: int,
        samples_per_class: int,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        checks = (("classes_per_batch", classes_per_batch, 2), ("samples_per_class", samples_per_class, 1))
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"ClassBalancedBatchSampler: {name} must be an integer >= {low}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"ClassBalancedBatchSampler: seed must be an integer, got {seed!r}")
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if y.ndim != 1 or len(y) == 0:
            raise DataError(f"ClassBalancedBatchSampler: labels must be a non-empty 1-D array, got shape {y.shape}")
        self.classes_per_batch = int(classes_per_batch)
        self.samples_per_class = int(samples_per_class)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        classes, class_of, counts = np.unique(y, return_inverse=True, return_counts=True)
        p, m = self.classes_per_batch, self.samples_per_class
        if len(classes) < p:
            raise DataError(
                f"ClassBalancedBatchSampler: labels have {len(classes)} classes, fewer than classes_per_batch={p}"
            )
        if m > 1 and np.any(counts == 1):
            singles = classes[counts == 1]
            warnings.warn(
                f"ClassBalancedBatchSampler: {len(singles)} class(es) have a single image (e.g. {singles[0]!r}); "
                f"each of their chunks repeats that image {m} times",
                stacklevel=2,
            )
        self._num_images = len(y)
        self._class_of = class_of.reshape(-1).astype(np.int64)
        self._counts = counts.astype(np.int64)
        self._class_start = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)
        self._chunks = -(-self._counts // m)  # ceil
        self._num_chunks = int(self._chunks.sum())
        self._num_full = _max_full_batches(self._chunks, p)
        if self.drop_last:
            self._num_batches = self._num_full
        else:
            self._num_batches = max(math.ceil(self._num_chunks / p), int(self._chunks.max()))
        self.num_repeated = int(self._num_chunks * m - self._num_images)
        # From the class index per image and the class names: object arrays' raw bytes are pointers.
        digest = hashlib.sha1(self._class_of.tobytes())
        digest.update("\x00".join(map(str, classes.tolist())).encode())
        self._labels_digest = digest.hexdigest()
        self._epoch = 0
        self._start = 0  # first batch of the next __iter__ (a resume point), then back to 0
        self._position = 0  # batches handed out by the current / last __iter__
        self._cache: tuple[int, list[np.ndarray], dict[str, int]] | None = None

    # ----------------------------------------------------------------- sizes
    def __len__(self) -> int:
        return self._num_batches

    @property
    def batch_size(self) -> int:
        """Images in a full batch, ``P * m``."""
        return self.classes_per_batch * self.samples_per_class

    @property
    def num_full_batches(self) -> int:
        """Batches of exactly ``P`` classes per epoch (all of them unless ``drop_last=False`` adds smaller ones)."""
        return self._num_full

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches handed out so far in this epoch (or the resume point before iterating)."""
        return self._position

    # ----------------------------------------------------------------- epochs
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's batches; the next iteration starts at batch ``start_batch`` (a resume)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"ClassBalancedBatchSampler.set_epoch: epoch must be an integer >= 0, got {epoch!r}")
        if not 0 <= int(start_batch) <= len(self):
            raise ConfigError(
                f"ClassBalancedBatchSampler.set_epoch: start_batch must be in 0..{len(self)}, got {start_batch!r}"
            )
        self._epoch = int(epoch)
        self._start = int(start_batch)
        self._position = int(start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self._epoch)
        start, self._start = self._start, 0
        self._position = start
        for i in range(start, len(batches)):
            self._position = i + 1
            yield batches[i].tolist()

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one) as lists of indices; no side effect."""
        return [b.tolist() for b in self._epoch_batches(self._epoch if epoch is None else int(epoch))]

    def epoch_stats(self, epoch: int | None = None) -> dict[str, int]:
        """Counts for logs: ``batches``, ``images`` (slots), ``repeated`` (top-ups), ``dropped_chunks``,
        ``unseen_images`` (images in no batch of the epoch; 0 unless ``drop_last`` drops chunks)."""
        e = self._epoch if epoch is None else int(epoch)
        self._epoch_batches(e)
        assert self._cache is not None
        return dict(self._cache[2])

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Seed, epoch and position within the epoch, plus a fingerprint of the labels and settings."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
            "classes_per_batch": self.classes_per_batch,
            "samples_per_class": self.samples_per_class,
            "drop_last": self.drop_last,
            "num_images": self._num_images,
            "labels_sha1": self._labels_digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore seed, epoch and position; the next iteration yields the remaining batches of that epoch.

        Raises CheckpointError when the state was made for other labels or batch settings.
        """
        required = ("seed", "epoch", "position", "classes_per_batch", "samples_per_class", "drop_last",
                    "num_images", "labels_sha1")
        missing = [k for k in required if k not in state]
        if missing:
            raise CheckpointError(f"sampler state lacks {', '.join(missing)}")
        for key, mine in (
            ("classes_per_batch", self.classes_per_batch),
            ("samples_per_class", self.samples_per_class),
            ("drop_last", self.drop_last),
            ("num_images", self._num_images),
        ):
            if state[key] != mine:
                raise CheckpointError(f"sampler state has {key}={state[key]!r}, this sampler {mine!r}")
        if state["labels_sha1"] != self._labels_digest:
            raise CheckpointError("sampler state was made for different training labels (the data changed)")
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise CheckpointError(f"sampler state position {position} is outside 0..{len(self)}")
        self.seed = int(state["seed"])
        self._cache = None
        self.set_epoch(int(state["epoch"]), start_batch=position)

    # ----------------------------------------------------------------- the plan
    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            batches, stats = self._plan(epoch)
            self._cache = (epoch, batches, stats)
        return self._cache[1]

    def _plan(self, epoch: int) -> tuple[list[np.ndarray], dict[str, int]]:
        m = self.samples_per_class
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        # Images grouped by class, in random order within the class (random keys are a permutation: no ties).
        keys = torch.randperm(self._num_images, generator=gen).numpy()
        order = np.lexsort((keys, self._class_of))
        # Chunk table (K, m): slot j of class c is its (j mod n_c)-th shuffled image, which is the top-up rule.
        chunk_class = np.repeat(np.arange(len(self._counts)), self._chunks)
        first_chunk = np.concatenate([[0], np.cumsum(self._chunks)[:-1]])
        chunk_rank = np.arange(self._num_chunks) - np.repeat(first_chunk, self._chunks)
        slots = chunk_rank[:, None] * m + np.arange(m)[None, :]
        chunk_images = order[self._class_start[chunk_class][:, None] + slots % self._counts[chunk_class][:, None]]
        queue = torch.randperm(self._num_chunks, generator=gen).numpy()
        full, rest = self._assemble(chunk_class[queue])
        batches = [chunk_images[queue[pos]].reshape(-1) for pos in full]
        if not self.drop_last:
            batches += [chunk_images[queue[pos]].reshape(-1) for pos in rest]
        assert len(batches) == self._num_batches, (len(batches), self._num_batches)
        seen = np.zeros(self._num_images, dtype=bool)
        for b in batches:
            seen[b] = True
        dropped = sum(len(r) for r in rest) if self.drop_last else 0
        stats = {
            "epoch": epoch,
            "batches": len(batches),
            "images": int(sum(len(b) for b in batches)),
            "repeated": self.num_repeated,
            "dropped_chunks": int(dropped),
            "unseen_images": int((~seen).sum()),
        }
        return batches, stats

    def _assemble(self, queue_class: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Queue positions of each full batch, and of each leftover batch, from the chunks' classes in queue order."""
        p = self.classes_per_batch
        n_chunks = len(queue_class)
        # Queue positions of each class's chunks, in queue order; a class uses them front to back.
        by_class = np.argsort(queue_class, kind="stable")
        pointer = np.concatenate([[0], np.cumsum(self._chunks)[:-1]]).astype(np.int64)
        remaining = self._chunks.copy()
        used = np.zeros(n_chunks, dtype=bool)
        head = 0
        full: list[np.ndarray] = []
        picked: list[int] = []
        in_batch: set[int] = set()

        def take(c: int) -> None:
            # A class always gives its earliest unused chunk, so its chunks leave in queue order.
            pos = int(by_class[pointer[c]])
            pointer[c] += 1
            remaining[c] -= 1
            used[pos] = True
            picked.append(pos)
            in_batch.add(c)

        for b in range(self._num_full):
            rows = self._num_full - b  # full batches still to fill, this one included
            picked.clear()
            in_batch.clear()
            for c in self._forced_classes(remaining, rows, self._num_batches - b, by_class, pointer):
                take(c)
            while head < n_chunks and used[head]:
                head += 1
            i = head
            while len(picked) < p:
                if i >= n_chunks:  # impossible while the invariant holds
                    raise AssertionError("ClassBalancedBatchSampler: chunk assembly ran out of classes")
                c = int(queue_class[i])
                if not used[i] and c not in in_batch:
                    take(c)
                i += 1
            full.append(np.array(picked, dtype=np.int64))
        leftover = np.flatnonzero(~used)
        n_rest = self._num_batches - self._num_full if not self.drop_last else 0
        if len(leftover) == 0:
            return full, []
        if n_rest == 0:
            return full, [leftover]
        # Spread the leftover over n_rest batches: group by class (classes in order of first appearance),
        # deal position j to batch j mod n_rest; no class has more than n_rest chunks left, so none repeats.
        cls = queue_class[leftover]
        _, first_seen = np.unique(cls, return_index=True)
        rank = np.empty(len(self._chunks), dtype=np.int64)
        rank[cls[np.sort(first_seen)]] = np.arange(len(first_seen))
        dealt = leftover[np.lexsort((leftover, rank[cls]))]
        return full, [dealt[j::n_rest] for j in range(n_rest)]

    def _forced_classes(
        self, remaining: np.ndarray, rows: int, batches_left: int, by_class: np.ndarray, pointer: np.ndarray
    ) -> list[int]:
        """Classes the current full batch must contain so that the rest of the epoch stays possible.

        Full batches: with ``rows`` left, classes with ``>= rows`` chunks are saturated; leaving out
        one of them costs one unit of the slack ``sum_c min(r_c, rows) - P*rows``, so at least
        ``#saturated - slack`` of them go in. ``drop_last=False`` also needs every class with
        ``>= batches_left`` chunks now, or its chunks could not be spread over the remaining batches.
        """
        saturated = np.flatnonzero(remaining >= rows)
        if len(saturated) == 0:
            return []
        slack = int(np.minimum(remaining, rows).sum()) - self.classes_per_batch * rows
        need = max(0, len(saturated) - slack)
        must = np.flatnonzero(remaining >= batches_left) if not self.drop_last else np.empty(0, dtype=np.int64)
        if need <= len(must):
            return must.tolist()
        # Earliest next chunk in the shuffled queue first: keeps the forced choice random, yet deterministic.
        others = np.setdiff1d(saturated, must)
        next_pos = by_class[pointer[others]]
        extra = others[np.argsort(next_pos, kind="stable")[: need - len(must)]]
        return must.tolist() + extra.tolist()


# --------------------------------------------------------------------------------------------- sharding
_T = TypeVar("_T")


def shard_batch(batch: Sequence[_T], rank: int, world_size: int, samples_per_class: int) -> list[_T]:
    """Process ``rank``'s part of a class-balanced batch for distributed training: the ``rank``-th of
    ``world_size`` equal contiguous slices.

    The ``m = samples_per_class`` images of a class are adjacent in a :class:`ClassBalancedBatchSampler` batch
    and each class appears once, so a slice whose length is a multiple of ``m`` holds whole classes: every
    process gets ``P / W`` classes with ``m`` images each (its positives are local), and the slices in rank
    order are the batch itself. Raises ConfigError when the batch does not split into whole classes.
    """
    n = len(batch)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"shard_batch: rank {rank} is not in 0..{world_size - 1}")
    if n % (world_size * samples_per_class) != 0:
        raise ConfigError(
            f"shard_batch: a batch of {n} images ({n // max(samples_per_class, 1)} classes x {samples_per_class}) "
            f"cannot be split into {world_size} parts of whole classes; data.classes_per_batch must be a multiple "
            f"of the number of processes ({world_size})"
        )
    size = n // world_size
    return list(batch[rank * size: (rank + 1) * size])


class ShardedBatchSampler(Sampler[list[int]]):
    """One process's part of every batch of a :class:`ClassBalancedBatchSampler` (:func:`shard_batch`).

    Every process builds the same sampler (same labels and seed) and wraps it with its own ``rank``: the
    processes see disjoint parts of the same global batches, in step. ``set_epoch``, ``state_dict`` and
    ``load_state_dict`` act on the wrapped sampler, whose position counts global batches.
    """

    def __init__(self, sampler: ClassBalancedBatchSampler, rank: int, world_size: int) -> None:
        if sampler.classes_per_batch % world_size != 0:
            raise ConfigError(
                f"ShardedBatchSampler: classes_per_batch={sampler.classes_per_batch} is not a multiple of the "
                f"{world_size} processes, so a batch cannot be split into whole classes"
            )
        if not sampler.drop_last and sampler.num_full_batches != len(sampler):
            # The smaller final batches of drop_last=False need not split evenly.
            raise ConfigError("ShardedBatchSampler: needs a sampler with drop_last=True (only full batches)")
        if not 0 <= rank < world_size:
            raise ConfigError(f"ShardedBatchSampler: rank {rank} is not in 0..{world_size - 1}")
        self.sampler = sampler
        self.rank = int(rank)
        self.world_size = int(world_size)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler:
            yield shard_batch(batch, self.rank, self.world_size, self.sampler.samples_per_class)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch=start_batch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
