"""MDR and LSD against independent NumPy implementations of methods.md §3.1 and §4.1, plus their edge cases.

The oracles below are written from the formulas, loop by loop, in float64; they never call dmlgen.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from dmlgen.errors import ConfigError
from dmlgen.engine.teacher import EpochSnapshotTeacher
from dmlgen.losses.distances import euclidean_distance_matrix, shared_distance_matrix, shared_gram_matrices
from dmlgen.losses.regularizers import (
    ListwiseSelfDistillation,
    MDRRegularizer,
    build_regularizer,
    lsd_loss,
    mdr_loss,
)
from dmlgen.models.heads import scale_by_mean_distance
from _fixtures import one_thread  # noqa: F401  (autouse: one thread per test)


# ----------------------------------------------------------------------------------------------- oracles
def np_distances(x: np.ndarray) -> np.ndarray:
    n = len(x)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                d[i, j] = math.sqrt(max(float(((x[i] - x[j]) ** 2).sum()), 1e-12))
    return d


class NumpyMDR:
    """methods.md §3.1 step by step: statistics (EMA, first call copies), z over ordered pairs, nearest level."""

    def __init__(self, levels=(-3.0, 0.0, 3.0), momentum=0.9, include_diagonal=True):
        self.levels = np.array(levels, dtype=np.float64)
        self.momentum = momentum
        self.include_diagonal = include_diagonal
        self.mu = self.sd = None

    def __call__(self, x: np.ndarray, training: bool = True) -> float:
        n = len(x)
        d = np_distances(x)
        if self.include_diagonal:
            values = d.flatten()
        else:
            values = np.array([d[i, j] for i in range(n) for j in range(n) if i != j])
        mu_b, sd_b = values.mean(), values.std(ddof=1)
        if training:
            if self.mu is None:
                self.mu, self.sd = mu_b, sd_b
            else:
                self.mu = self.momentum * self.mu + (1 - self.momentum) * mu_b
                self.sd = self.momentum * self.sd + (1 - self.momentum) * sd_b
        total, count = 0.0, 0
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                z = (d[i, j] - self.mu) / max(self.sd, 1e-6)
                total += min(abs(z - s) for s in self.levels)
                count += 1
        return total / count


def np_lsd(student: np.ndarray, teacher: np.ndarray, tau: float, include_self=True, neg_scale=1.0,
           labels=None) -> float:
    """(1/N) Σ_i KL(p^T_i ‖ p^S_i), one anchor at a time."""
    n = len(student)
    total = 0.0
    for i in range(n):
        js = [j for j in range(n) if include_self or j != i]
        s = []
        t = []
        for j in js:
            sij, tij = float(student[i] @ student[j]), float(teacher[i] @ teacher[j])
            if labels is not None and labels[i] != labels[j]:
                sij, tij = sij * neg_scale, tij * neg_scale
            s.append(sij / tau)
            t.append(tij / tau)
        s, t = np.array(s), np.array(t)
        log_ps = s - s.max() - math.log(np.exp(s - s.max()).sum())
        log_pt = t - t.max() - math.log(np.exp(t - t.max()).sum())
        total += float((np.exp(log_pt) * (log_pt - log_ps)).sum())
    return total / n


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ----------------------------------------------------------------------------------------------- MDR
@pytest.mark.parametrize("include_diagonal", [True, False])
def test_mdr_matches_numpy_over_successive_steps(include_diagonal: bool) -> None:
    reg = MDRRegularizer(weight=0.3, stats_include_diagonal=include_diagonal).double()
    oracle = NumpyMDR(include_diagonal=include_diagonal)
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(9, 5, generator=g, dtype=torch.float64) * (1 + step)
        got = float(reg(x).detach())
        want = oracle(x.numpy())
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), step
        assert float(reg.running_mean) == pytest.approx(oracle.mu, rel=1e-12)
        assert float(reg.running_std) == pytest.approx(oracle.sd, rel=1e-12)


def test_mdr_diagonal_flag_changes_sigma_as_documented() -> None:
    # methods.md §3.1: random 512-d Gaussian batch of 128 after mean-distance scaling: σ 0.093 with the
    # diagonal zeros (official), 0.030 without.
    x = scale_by_mean_distance(torch.randn(128, 512, generator=torch.Generator().manual_seed(0)))
    with_diag, without = MDRRegularizer(), MDRRegularizer(stats_include_diagonal=False)
    d = torch.cdist(x, x)
    _, sd_with = with_diag.batch_statistics(d)
    _, sd_without = without.batch_statistics(d)
    assert float(sd_with) == pytest.approx(0.093, abs=0.005)
    assert float(sd_without) == pytest.approx(0.030, abs=0.005)


def test_mdr_zero_when_every_distance_sits_on_a_level() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    reg = MDRRegularizer().double()
    reg(x)  # initialise the statistics from this batch
    d = np_distances(x.numpy())
    z = [(d[i, j] - float(reg.running_mean)) / float(reg.running_std) for i, j in ((0, 1), (0, 2), (1, 2))]
    with torch.no_grad():
        reg.levels.copy_(torch.tensor(z))
    reg.eval()
    assert float(reg(x).detach()) == pytest.approx(0.0, abs=1e-12)


def test_mdr_ordered_pairs_equal_upper_triangle_mean() -> None:
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reg = MDRRegularizer().double()
    value = float(reg(x).detach())
    d = np_distances(x.numpy())
    mu, sd = float(reg.running_mean), float(reg.running_std)
    upper = [min(abs((d[i, j] - mu) / sd - s) for s in (-3, 0, 3)) for i in range(7) for j in range(i + 1, 7)]
    assert value == pytest.approx(float(np.mean(upper)), rel=1e-12)


def test_mdr_mean_after_scaling_is_n_minus_one_over_n() -> None:
    n = 128
    x = scale_by_mean_distance(torch.randn(n, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    mean, _ = MDRRegularizer().batch_statistics(torch.cdist(x, x))
    assert float(mean) == pytest.approx((n - 1) / n, rel=1e-9)  # 0.9921875


def test_mdr_buffers_frozen_in_eval_and_state_dict_round_trip() -> None:
    reg = MDRRegularizer(levels=[-2.0, 0.5, 2.5])
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    reg(x)
    reg(x * 2)
    mu, sd = reg.running_mean.clone(), reg.running_std.clone()
    reg.eval()
    reg(x * 5)
    assert torch.equal(reg.running_mean, mu) and torch.equal(reg.running_std, sd)
    other = MDRRegularizer()
    other.load_state_dict(reg.state_dict())
    assert torch.equal(other.levels, reg.levels) and bool(other.initialized)
    assert torch.equal(other.running_mean, mu) and torch.equal(other.running_std, sd)
    assert set(reg.state_dict()) == {"levels", "running_mean", "running_std", "initialized"}


def _mdr_on_shared_matrix(reg: MDRRegularizer, x: torch.Tensor) -> torch.Tensor:
    """``reg(x)`` inside a step block in which ``x``'s distance matrix was built first (MDR's shared path)."""
    with shared_gram_matrices():
        euclidean_distance_matrix(x)
        return reg(x)


def test_mdr_gradients_of_levels_and_embeddings() -> None:
    reg = MDRRegularizer(level_penalty=0.01).double()
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reg(x)  # statistics fixed from here on
    reg.eval()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: reg(e), (x,))
    assert torch.autograd.gradcheck(lambda e: _mdr_on_shared_matrix(reg, e), (x,))
    # ∂L/∂s_k = -(1/P) Σ_{pairs at k} sign(z - s_k) + 2 ν s_k (methods.md §3.1, step 9; λ applied outside)
    loss = reg(x.detach()) + reg.penalty()
    loss.backward()
    d = np_distances(x.detach().numpy())
    mu, sd = float(reg.running_mean), float(reg.running_std)
    levels = reg.levels.detach().numpy()
    want = 2 * 0.01 * levels.copy()
    pairs = [(i, j) for i in range(10) for j in range(10) if i != j]
    for i, j in pairs:
        z = (d[i, j] - mu) / sd
        k = int(np.argmin(np.abs(z - levels)))
        want[k] -= np.sign(z - levels[k]) / len(pairs)
    np.testing.assert_allclose(reg.levels.grad.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("levels", [[-2.0, 0.0, 1.0, 3.0], [1.0, -2.0, 3.0, 0.0], [0.5]], ids=["sorted", "unsorted", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_duplicate", [True, False])
@pytest.mark.parametrize("shared", [False, True], ids=["own-matrix", "shared-matrix"])
def test_mdr_closed_form_backward_matches_autograd_of_mdr_loss(dtype: torch.dtype, levels: list[float],
                                                               with_duplicate: bool, shared: bool) -> None:
    """The module's closed-form forward and backward against autograd through the functional core on the
    distance matrix (levels in any order: the module sorts them internally). ``shared``: inside a step block
    where another consumer built the batch's distance matrix, so MDR hands its gradient to that matrix."""
    g = torch.Generator().manual_seed(11)
    for trial in range(3):
        x = torch.randn(48, 16, generator=g, dtype=dtype)
        if with_duplicate:  # a clamped distance, zero gradient in both (the module's masked path)
            x[5] = x[7]
        reg = MDRRegularizer(levels=levels).to(dtype)
        if trial:
            reg(x)  # running statistics that differ from the batch's
        emb = x.clone().requires_grad_(True)
        with shared_gram_matrices() if shared else contextlib.nullcontext():
            if shared:
                other_consumer = euclidean_distance_matrix(emb)
                assert shared_distance_matrix(emb) is other_consumer
            value = reg(emb)
        value.backward()
        ref_x = x.clone().requires_grad_(True)
        ref_levels = reg.levels.detach().clone().requires_grad_(True)
        ref = mdr_loss(euclidean_distance_matrix(ref_x), reg.running_mean.to(dtype), reg.running_std.to(dtype),
                       ref_levels)
        ref.backward()
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(value, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(emb.grad, ref_x.grad, rtol=tol * 10, atol=tol)
        torch.testing.assert_close(reg.levels.grad, ref_levels.grad, rtol=tol, atol=tol)
        assert emb.grad.abs().sum() > 0


@pytest.mark.parametrize("x", [torch.randn(1, 8), torch.ones(6, 8), torch.zeros(4, 3)],
                         ids=["one-sample", "identical", "all-zero"])
def test_mdr_degenerate_batches_stay_finite(x: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    reg = MDRRegularizer()
    value = reg(x)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    if len(x) == 1:
        assert float(value.detach()) == 0.0 and not bool(reg.initialized)


def test_mdr_fp16_input_is_computed_in_fp32() -> None:
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(6))
    value16 = MDRRegularizer()(x.half())
    value32 = MDRRegularizer()(x.half().float())
    assert value16.dtype == torch.float32 and float(value16.detach()) == pytest.approx(float(value32.detach()), rel=1e-6)


def test_mdr_bad_parameters() -> None:
    with pytest.raises(ConfigError, match="levels"):
        MDRRegularizer(levels=[])
    with pytest.raises(ConfigError, match="momentum"):
        MDRRegularizer(momentum=1.0)
    with pytest.raises(ConfigError, match="weight"):
        MDRRegularizer(weight=-1)
    with pytest.raises(ConfigError, match="accepted"):
        build_regularizer("mdr", lamda=0.1)


# ----------------------------------------------------------------------------------------------- LSD
@pytest.mark.parametrize("include_self, neg_scale, tau", [(True, 1.0, 1.0), (False, 1.0, 0.5),
                                                          (True, 2.0, 0.1)])
def test_lsd_matches_numpy_per_anchor_loop(include_self: bool, neg_scale: float, tau: float) -> None:
    s, t = unit_rows(11, 6, 0), unit_rows(11, 6, 1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4])
    got = float(lsd_loss(s, t, tau, include_self=include_self, neg_scale=neg_scale, labels=labels))
    want = np_lsd(s.numpy(), t.numpy(), tau, include_self, neg_scale, labels.tolist())
    assert got == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_lsd_module_normalises_and_is_zero_for_its_own_teacher() -> None:
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reg = ListwiseSelfDistillation(weight=50.0, tau=0.5)
    assert float(reg(x, None, x.clone())) == pytest.approx(0.0, abs=1e-14)
    t = torch.randn(8, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = np_lsd(torch.nn.functional.normalize(x, dim=1).numpy(), torch.nn.functional.normalize(t, dim=1).numpy(), 0.5)
    assert float(reg(x * 3, None, t * 7)) == pytest.approx(want, rel=1e-10)


def test_lsd_weight_schedule() -> None:
    reg = ListwiseSelfDistillation(weight=50.0, tau=2.0)
    assert reg.weight_at(0, 10) == 0.0
    assert reg.weight_at(9, 10) == pytest.approx(9 / 10 * 50.0 * 4.0)
    assert reg.weight_at(3, 10) == pytest.approx(0.3 * 200.0)


def test_lsd_gradient_reaches_the_student_only() -> None:
    s = unit_rows(6, 4, 4).requires_grad_(True)
    t = unit_rows(6, 4, 5).requires_grad_(True)
    reg = ListwiseSelfDistillation()
    reg(s, None, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    s2 = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: reg(e, None, t.detach()), (s2,))


@pytest.mark.parametrize("include_self", [True, False])
def test_lsd_edge_batches(include_self: bool) -> None:
    reg = ListwiseSelfDistillation(include_self=include_self)
    one = torch.randn(1, 4, requires_grad=True)
    assert float(reg(one, None, torch.randn(1, 4)).detach()) == 0.0
    collapsed = torch.ones(5, 4, requires_grad=True)
    value = reg(collapsed, None, torch.ones(5, 4))
    value.backward()
    assert float(value.detach()) == pytest.approx(0.0, abs=1e-7) and torch.isfinite(collapsed.grad).all()
    half = reg(torch.randn(6, 4).half(), None, torch.randn(6, 4).half())
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_lsd_bad_input() -> None:
    reg = ListwiseSelfDistillation()
    with pytest.raises(ConfigError, match="teacher"):
        reg(torch.randn(4, 3))
    with pytest.raises(ConfigError, match="do not match"):
        reg(torch.randn(4, 3), None, torch.randn(5, 3))
    with pytest.raises(ConfigError, match="tau"):
        ListwiseSelfDistillation(tau=0)


# ----------------------------------------------------------------------------------------------- teacher
def test_teacher_snapshot_is_independent_until_refreshed() -> None:
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher = EpochSnapshotTeacher(student)
    assert not bool(teacher.valid)
    x = torch.randn(5, 4)
    before = teacher(x)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert torch.equal(teacher(x), before)  # editing the student leaves the teacher alone
    teacher.refresh(student)
    assert bool(teacher.valid)
    student.eval()
    assert torch.allclose(teacher(x), student(x))
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(teacher.parameters(), student.parameters()))
    teacher.train()
    assert not teacher.model.training  # BatchNorm of the teacher never uses or updates batch statistics


# ----------------------------------------------------------------------------------------------- training
def _tiny_run_config(out, *overrides: str):
    from dmlgen.engine.config import config_from_dict

    data = {
        "name": "tiny-reg",
        "data": {"dataset": "omniglot", "max_classes": 8, "classes_per_batch": 4, "samples_per_class": 4},
        "model": {"backbone": "convnet4", "embedding_size": 16},
        "loss": {"name": "multi_similarity", "params": {}},
        "regularizers": [{"name": "mdr", "weight": 0.2}, {"name": "lsd", "weight": 50.0}],
        "optimizer": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 2, "max_steps_per_epoch": 3, "seed": 0, "log_every": 1},
    }
    cfg = config_from_dict(data, list(overrides))
    cfg.out_dir = str(out)
    return cfg


def test_training_with_mdr_and_lsd_logs_and_checkpoints_them(tmp_path) -> None:
    import csv
    import json

    from dmlgen.engine.checkpoint import load_checkpoint
    from dmlgen.engine.trainer import LAST, Trainer

    trainer = Trainer(_tiny_run_config(tmp_path), progress=False)
    names = [g["name"] for g in trainer.optimizer.param_groups]
    assert "regularizers" in names  # MDR's levels are trained
    levels_before = trainer.regularizers["mdr"].levels.detach().clone()
    trainer.fit()
    rows = list(csv.DictReader((tmp_path / "epochs.csv").open()))
    assert float(rows[0]["train_mdr"]) > 0 and rows[0]["train_lsd"] == ""  # no teacher in epoch 1
    assert float(rows[1]["train_lsd"]) >= 0 and rows[1]["train_lsd"] != ""
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open() if '"step"' in line]
    assert len(steps) == 6 and all("mdr" in s for s in steps)
    assert [("lsd" in s) for s in steps] == [False] * 3 + [True] * 3
    ckpt = load_checkpoint(tmp_path / LAST)
    assert bool(ckpt["regularizers"]["mdr.initialized"]) and bool(ckpt["teacher"]["valid"])
    assert not torch.equal(ckpt["regularizers"]["mdr.levels"], levels_before)
    # the teacher holds the weights of the end of the last epoch
    for key, value in ckpt["model"].items():
        assert torch.equal(ckpt["teacher"]["model." + key], value), key


def test_resume_with_regularizers_gives_the_same_next_step(tmp_path, monkeypatch) -> None:
    from dmlgen.engine.checkpoint import load_checkpoint
    from dmlgen.engine.trainer import LAST, Trainer, TrainingInterrupted

    straight = tmp_path / "straight"
    Trainer(_tiny_run_config(straight), progress=False).fit()

    original = Trainer._train_step
    count = {"n": 0}

    def step(self, images, labels):
        count["n"] += 1
        if count["n"] == 5:  # after one step of epoch 2, where LSD is active
            raise KeyboardInterrupt
        return original(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", step)
    resumed = tmp_path / "resumed"
    with pytest.raises(TrainingInterrupted):
        Trainer(_tiny_run_config(resumed), progress=False).fit()
    monkeypatch.undo()
    Trainer(_tiny_run_config(resumed), progress=False, pretrained=False).fit(resume=True)
    a, b = load_checkpoint(straight / LAST), load_checkpoint(resumed / LAST)
    for part in ("model", "regularizers", "teacher"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    timing = ("train_seconds", "images_per_second")
    strip = [[{k: v for k, v in r.items() if k not in timing} for r in c["history"]] for c in (a, b)]
    assert strip[0] == strip[1]


def test_regularizer_config_errors(tmp_path) -> None:
    from dmlgen.engine.setup import build_regularizers

    with pytest.raises(ConfigError, match="unknown regularizer|mdrr"):
        build_regularizers(_tiny_run_config(tmp_path, "regularizers=[{name: mdrr}]").regularizers)
    with pytest.raises(ConfigError, match="listed twice"):
        build_regularizers(_tiny_run_config(tmp_path, "regularizers=[{name: mdr}, {name: mdr}]").regularizers)
    with pytest.raises(ConfigError, match="set regularizers\\[0\\].weight"):
        build_regularizers(_tiny_run_config(tmp_path, "regularizers=[{name: lsd, params: {weight: 2}}]").regularizers)
    with pytest.raises(ConfigError, match="weight"):
        _tiny_run_config(tmp_path, "regularizers=[{name: lsd, weight: -1}]")
    with pytest.raises(ConfigError, match="normalize: false"):
        _tiny_run_config(tmp_path, "model.scale_by_mean_distance=true")


# ----------------------------------------------------------------------------------------------- any loss
def _registered_losses() -> list[str]:
    from dmlgen.losses import LOSSES

    return sorted(LOSSES)


@pytest.mark.parametrize("loss_name", _registered_losses())
def test_every_registered_loss_combines_with_mdr_and_lsd(loss_name: str) -> None:
    import inspect

    from dmlgen.losses import LOSSES, build_loss

    params: dict = {}
    accepted = inspect.signature(LOSSES[loss_name]).parameters
    if "num_classes" in accepted:
        params["num_classes"] = 4
    if "embedding_size" in accepted:
        params["embedding_size"] = 8
    loss = build_loss(loss_name, **params)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4)
    teacher = x.detach() + 0.3 * torch.randn(16, 8, generator=g)
    mdr, lsd = MDRRegularizer(weight=0.2), ListwiseSelfDistillation(weight=50.0)
    base = loss(x, labels)
    (grad_base,) = torch.autograd.grad(base, x, retain_graph=True)
    total = base + mdr.weight * mdr(x) + mdr.penalty() + lsd.weight_at(1, 2) * lsd(x, labels, teacher)
    (grad_total,) = torch.autograd.grad(total, x)
    assert torch.isfinite(total) and torch.isfinite(grad_total).all()
    assert not torch.allclose(grad_total, grad_base)  # both regularizers reach the embeddings
