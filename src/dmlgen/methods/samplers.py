"""Batch samplers of the shared ("inter-class") stream of Sharing and MIC (methods.md §2.1, §5.2, §5.6).

Both are ``batch_sampler`` s whose batch ``b`` of epoch ``e`` is a pure function of ``(seed, e, b)`` (and,
for clusters, of the current cluster labels): :meth:`batch` returns the dataset indices and the label each
slot carries in the shared loss (its surrogate id or cluster id). A resumed run therefore needs only the
position, and the training step recomputes the slot labels of the batch it received; nothing is kept in a
``Dataset``, so any number of loader workers gives the same batches.

The interface matches :class:`dmlgen.data.samplers.ClassBalancedBatchSampler` as the engine uses it:
``len()``, ``set_epoch(epoch, start_batch)``, iteration from ``start_batch``, ``state_dict`` /
``load_state_dict``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from dmlgen.errors import CheckpointError, ConfigError, DataError

_TAG_PERMUTATION, _TAG_IDS, _TAG_CLUSTERS = 11, 12, 13


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) % 2**63 for k in keys]))


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class _PlannedBatches(Sampler[list[int]]):
    """``num_batches`` batches per epoch, each a pure function of ``(seed, epoch, number)``."""

    def __init__(self, batch_size: int, num_batches: int, seed: int) -> None:
        owner = type(self).__name__
        self.batch_size = _positive_int(owner, "batch_size", batch_size, 2)
        self.num_batches = _positive_int(owner, "num_batches", num_batches)
        self.seed = int(seed)
        self._epoch = 0
        self._start = 0
        self._position = 0

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields batches ``start_batch..`` of ``epoch``."""
        if not 0 <= start_batch <= self.num_batches:
            raise DataError(f"{type(self).__name__}: start_batch {start_batch} outside 0..{self.num_batches}")
        self._epoch, self._start, self._position = int(epoch), int(start_batch), int(start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        start, self._start = self._start, 0
        for number in range(start, self.num_batches):
            self._position = number + 1
            yield self.batch(self._epoch, number)[0].tolist()

    def batch(self, epoch: int, number: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices (B,), slot labels (B,))`` int64 of batch ``number`` of ``epoch``; no side effect."""
        raise NotImplementedError

    def _fingerprint(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self._epoch, "position": self._position,
                "batch_size": self.batch_size, "num_batches": self.num_batches, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore seed, epoch and position; settings that differ are a CheckpointError."""
        mine = self.state_dict()
        for key in ("batch_size", "num_batches", *self._fingerprint()):
            if state.get(key) != mine[key]:
                raise CheckpointError(f"{type(self).__name__} state has {key}={state.get(key)!r}, this sampler "
                                      f"{mine[key]!r}")
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]), start_batch=int(state["position"]))


class SurrogateGroupBatchSampler(_PlannedBatches):
    """Random training images in runs of ``group_size`` that share a random surrogate id (variant A, §5.2).

    The images of an epoch are successive random permutations of the whole training set (a new permutation
    when one is used up). Each run of ``group_size`` consecutive slots gets an id drawn uniformly from
    ``range(num_ids)`` avoiding the previous two ids of the batch, so neighbouring groups never share an id;
    groups further apart may (they then form one larger group). A batch of 112 with groups of 4 holds 28
    groups. The ids are tags only: they carry no information about the images.

    Args:
        num_images: size of the training set (indices ``0..num_images-1``).
        batch_size: images per batch (the class stream's batch size).
        num_batches: batches per epoch (the class stream's steps per epoch).
        group_size: images per surrogate group (4 in the reference).
        num_ids: the id range (196 by default; 200 in the reference's CUB script); at least 3.
        seed: the run's seed.
    """

    def __init__(self, num_images: int, batch_size: int, num_batches: int, *, group_size: int = 4,
                 num_ids: int = 196, seed: int = 0) -> None:
        super().__init__(batch_size, num_batches, seed)
        owner = type(self).__name__
        self.num_images = _positive_int(owner, "num_images", num_images, 2)
        self.group_size = _positive_int(owner, "group_size", group_size, 2)
        self.num_ids = _positive_int(owner, "num_ids", num_ids, 3)
        if self.batch_size < 2 * self.group_size:
            raise ConfigError(f"{owner}: batch_size {self.batch_size} holds fewer than 2 groups of "
                              f"{self.group_size}; negatives need another group")
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, epoch: int, cycle: int) -> np.ndarray:
        key = (epoch, cycle)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = _rng(self.seed, epoch, cycle, _TAG_PERMUTATION).permutation(self.num_images)
        return self._perms[key]

    def batch(self, epoch: int, number: int) -> tuple[np.ndarray, np.ndarray]:
        positions = np.arange(number * self.batch_size, (number + 1) * self.batch_size)
        cycles, offsets = np.divmod(positions, self.num_images)
        indices = np.empty(self.batch_size, dtype=np.int64)
        for cycle in np.unique(cycles):
            here = cycles == cycle
            indices[here] = self._permutation(epoch, int(cycle))[offsets[here]]
        return indices, self.surrogate_ids(epoch, number)

    def surrogate_ids(self, epoch: int, number: int) -> np.ndarray:
        """The slot labels of a batch: ``group_size`` repeats of each group's id, ``(B,)`` int64."""
        rng = _rng(self.seed, epoch, number, _TAG_IDS)
        groups = -(-self.batch_size // self.group_size)
        ids: list[int] = []
        for _ in range(groups):
            recent = ids[-2:]
            # Uniform over the ids not among the previous two: draw a rank among the allowed ones.
            choice = int(rng.integers(self.num_ids - len(set(recent))))
            for taken in sorted(set(recent)):
                if choice >= taken:
                    choice += 1
            ids.append(choice)
        return np.repeat(np.asarray(ids, dtype=np.int64), self.group_size)[: self.batch_size]

    def _fingerprint(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "group_size": self.group_size, "num_ids": self.num_ids}


class ClusterBatchSampler(_PlannedBatches):
    """``per_cluster`` images per pseudo-label cluster, with deliberate label noise (MIC, §5.6).

    A batch holds ``ceil(batch_size / per_cluster)`` groups. Each group takes a cluster (distinct clusters
    while there are enough non-empty ones, else drawn with replacement) and fills its slots with images of
    that cluster (without replacement, or with replacement when the cluster is smaller than the group). Then
    every slot, with probability ``random_pick_p``, gets an image of a random cluster instead but keeps the
    group's cluster id as its label, as in the reference.

    Args:
        cluster_labels: ``(N,)`` cluster id of every training image, or ``None`` until the first clustering
            (:meth:`set_cluster_labels`).
        batch_size, num_batches, seed: as :class:`SurrogateGroupBatchSampler`.
        per_cluster: images per group (4).
        random_pick_p: probability of the noisy pick (0.2), in [0, 1).
    """

    def __init__(self, cluster_labels: np.ndarray | None, batch_size: int, num_batches: int, *,
                 per_cluster: int = 4, random_pick_p: float = 0.2, seed: int = 0) -> None:
        super().__init__(batch_size, num_batches, seed)
        owner = type(self).__name__
        self.per_cluster = _positive_int(owner, "per_cluster", per_cluster, 2)
        if isinstance(random_pick_p, bool) or not isinstance(random_pick_p, (int, float)) \
                or not 0.0 <= random_pick_p < 1.0:
            raise ConfigError(f"{owner}: random_pick_p must be in [0, 1), got {random_pick_p!r}")
        self.random_pick_p = float(random_pick_p)
        self.cluster_labels: np.ndarray | None = None
        self._members: list[np.ndarray] = []
        self._digest = ""
        if cluster_labels is not None:
            self.set_cluster_labels(cluster_labels)

    def set_cluster_labels(self, cluster_labels: np.ndarray) -> None:
        """Use new pseudo labels ``(N,)`` (ints >= 0) from the next batch on."""
        labels = np.asarray(cluster_labels)
        if labels.ndim != 1 or len(labels) < 2 or labels.dtype.kind not in "iu" or labels.min() < 0:
            raise DataError(f"{type(self).__name__}: cluster labels must be (N,) non-negative ints, N >= 2")
        self.cluster_labels = labels.astype(np.int64)
        order = np.argsort(self.cluster_labels, kind="stable")
        ids, starts = np.unique(self.cluster_labels[order], return_index=True)
        self._ids = ids
        self._members = np.split(order, starts[1:])
        self._digest = hashlib.sha1(self.cluster_labels.tobytes()).hexdigest()

    def batch(self, epoch: int, number: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cluster_labels is None:
            raise DataError(f"{type(self).__name__}: no cluster labels yet (the first clustering runs at the "
                            "start of epoch 1)")
        rng = _rng(self.seed, epoch, number, _TAG_CLUSTERS)
        m = self.per_cluster
        groups = -(-self.batch_size // m)
        k = len(self._members)
        chosen = rng.choice(k, size=groups, replace=groups > k)
        indices = np.empty(groups * m, dtype=np.int64)
        for g, c in enumerate(chosen):
            members = self._members[c]
            indices[g * m:(g + 1) * m] = rng.choice(members, size=m, replace=len(members) < m)
        noisy = rng.random(groups * m) < self.random_pick_p
        for slot in np.flatnonzero(noisy):
            members = self._members[int(rng.integers(k))]
            indices[slot] = members[int(rng.integers(len(members)))]
        slot_labels = np.repeat(self._ids[chosen], m)
        return indices[: self.batch_size], slot_labels[: self.batch_size].astype(np.int64)

    def _fingerprint(self) -> dict[str, Any]:
        return {"per_cluster": self.per_cluster, "random_pick_p": self.random_pick_p,
                "cluster_labels_sha1": self._digest}


__all__ = ["ClusterBatchSampler", "SurrogateGroupBatchSampler"]
