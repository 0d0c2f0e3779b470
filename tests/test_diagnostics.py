"""Spectral decay and π-ratio against naive numpy oracles written here (methods.md §1.6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmlgen.errors import ConfigError, DataError
from dmlgen.evaluation import diagnostics
from dmlgen.evaluation.diagnostics import (
    density_ratio,
    numerical_rank,
    singular_value_spectrum,
    spectral_decay,
    spectral_decays,
)


# --------------------------------------------------------------------------- oracles
def oracle_rho(x: np.ndarray, mode: int) -> float:
    """KL divergences written element by element, from numpy's SVD."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    s = s if mode < 0 else s[mode - 1:]
    p = s / s.sum()
    p = np.maximum(p, 1e-12)
    p = p / p.sum()
    u = 1.0 / len(p)
    if mode < 0:
        return float(sum(pi * math.log(pi / u) for pi in p))
    return float(sum(u * math.log(u / pi) for pi in p))


def oracle_density(x: np.ndarray, y: np.ndarray, include_self: bool = False) -> dict[str, float]:
    """Double loops over pairs of unit vectors."""
    x = np.asarray(x, dtype=np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    classes = sorted(set(y.tolist()))
    intra = []
    for c in classes:
        rows = xn[y == c]
        if len(rows) < 2:
            continue
        d = [1.0 - rows[i] @ rows[j] for i in range(len(rows)) for j in range(len(rows)) if include_self or i != j]
        intra.append(np.mean(d))
    means = []
    for c in classes:
        m = xn[y == c].mean(axis=0)
        means.append(m / np.linalg.norm(m))
    inter = np.mean([1.0 - means[a] @ means[b] for a in range(len(means)) for b in range(len(means)) if a != b])
    return {"pi_intra": float(np.mean(intra)), "pi_inter": float(inter), "pi_ratio": float(np.mean(intra) / inter)}


# --------------------------------------------------------------------------- spectral decay
@pytest.mark.parametrize("shape", [(50, 16), (12, 40), (200, 64)])
@pytest.mark.parametrize("mode", [-1, 1, 2, 10])
def test_spectral_decay_matches_oracle(shape: tuple[int, int], mode: int) -> None:
    rng = np.random.default_rng(sum(shape) + mode)
    x = rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape[1]) + rng.normal(size=shape[1])
    assert spectral_decay(x, mode=mode) == pytest.approx(oracle_rho(x, mode), rel=1e-9, abs=1e-12)


def test_known_spectrum_keeps_the_smallest_singular_value() -> None:
    # X = U diag(4, 3, 2, 1) V^T: rho@1 from the closed form of §1.6 with all four values (the reference
    # TruncatedSVD(D-1) path would drop the 1).
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(30, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    s = np.array([4.0, 3.0, 2.0, 1.0])
    x = u @ np.diag(s) @ v.T
    p = s / s.sum()
    assert spectral_decay(x, 1) == pytest.approx(-math.log(4) - np.log(p).mean(), rel=1e-12)
    p2 = s[1:] / s[1:].sum()
    assert spectral_decay(x, 2) == pytest.approx(-math.log(3) - np.log(p2).mean(), rel=1e-12)
    assert spectral_decay(x, -1) == pytest.approx(math.log(4) + (p * np.log(p)).sum(), rel=1e-12)
    np.testing.assert_allclose(singular_value_spectrum(x), p, rtol=1e-12)


def test_uncentred_offset_changes_rho() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 8))
    shifted = x + 5.0
    # A common offset adds one dominant direction: with centring it would change nothing.
    assert spectral_decay(shifted, 1) > spectral_decay(x, 1) + 0.1
    assert spectral_decay(shifted, 1) == pytest.approx(oracle_rho(shifted, 1), rel=1e-9)


def test_flat_spectrum_is_zero_and_scale_invariant() -> None:
    assert spectral_decay(np.eye(6), 1) == pytest.approx(0.0, abs=1e-12)
    assert spectral_decay(np.eye(6), -1) == pytest.approx(0.0, abs=1e-12)
    x = np.random.default_rng(2).normal(size=(40, 10))
    assert spectral_decay(3.0 * x, 2) == pytest.approx(spectral_decay(x, 2), rel=1e-10)


def test_rank_deficient_input_gives_finite_rho() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 2)) @ rng.normal(size=(2, 16))  # rank 2 in 16-d
    rho = spectral_decay(x, 1)
    assert math.isfinite(rho) and rho > 10.0  # 14 of 16 entries at the 1e-12 floor
    assert rho == pytest.approx(oracle_rho(x, 1), rel=1e-6)
    assert math.isfinite(spectral_decay(x, -1))
    assert numerical_rank(x) == 2


def test_spectral_decays_reuses_one_svd_consistently() -> None:
    x = np.random.default_rng(4).normal(size=(80, 20))
    out = spectral_decays(x, modes=(-1, 1, 2, 10))
    assert set(out) == {"rho@-1", "rho@1", "rho@2", "rho@10", "rank"}
    for k in (-1, 1, 2, 10):
        assert out[f"rho@{k}"] == pytest.approx(spectral_decay(x, k), rel=1e-12)
    assert out["rank"] == 20.0


def test_singular_value_spectrum_is_a_distribution() -> None:
    x = np.random.default_rng(5).normal(size=(9, 30))
    p = singular_value_spectrum(x)
    assert p.shape == (9,) and p.dtype == np.float64
    assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) <= 0)


def test_accepts_tensors_with_grad() -> None:
    x = torch.randn(30, 5, requires_grad=True)
    assert spectral_decay(x, 1) == pytest.approx(oracle_rho(x.detach().numpy(), 1), rel=1e-5)


@pytest.mark.parametrize("mode, exc", [(0, ConfigError), (1.5, ConfigError), (True, ConfigError), (7, DataError)])
def test_bad_modes(mode: object, exc: type) -> None:
    with pytest.raises(exc):
        spectral_decay(np.random.default_rng(0).normal(size=(10, 6)), mode)  # type: ignore[arg-type]


@pytest.mark.parametrize("x, match", [
    (np.zeros((5, 3)), "all zero"),
    (np.array([[1.0, np.nan], [0.0, 1.0], [np.inf, 1.0]]), "2 of 3 rows"),
    (np.zeros((0, 4)), "empty"),
    (np.ones(4), "2-D"),
])
def test_bad_embeddings(x: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        spectral_decay(x, 1)


# --------------------------------------------------------------------------- density ratio
@pytest.mark.parametrize("include_self", [False, True])
def test_density_ratio_matches_oracle(include_self: bool) -> None:
    rng = np.random.default_rng(6)
    # Uneven class sizes, including a singleton class (in inter, not in intra).
    y = np.concatenate([np.full(n, c) for c, n in enumerate([2, 5, 1, 9, 3, 7])])
    centres = rng.normal(size=(6, 12))
    x = centres[y] + 0.7 * rng.normal(size=(len(y), 12))
    got = density_ratio(x, y, intra_include_self=include_self)
    want = oracle_density(x, y, include_self)
    assert set(got) == {"pi_intra", "pi_inter", "pi_ratio"}
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-10), key


def test_density_ratio_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 15, size=300)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    whole = density_ratio(x, y)
    monkeypatch.setattr(diagnostics, "_CHUNK", 7)
    chunked = density_ratio(torch.from_numpy(x), torch.from_numpy(y))
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)


def test_density_ratio_ignores_row_scale_and_label_values() -> None:
    rng = np.random.default_rng(8)
    y = np.repeat(np.arange(4), 5)
    x = rng.normal(size=(20, 5))
    scaled = x * rng.uniform(0.1, 10.0, size=(20, 1))
    relabelled = np.array([100, -3, 7, 42])[y]
    a, b, c = density_ratio(x, y), density_ratio(scaled, y), density_ratio(x, relabelled)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-10) and c[key] == pytest.approx(a[key], rel=1e-12)


def test_tight_classes_have_low_ratio() -> None:
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(10), 8)
    centres = rng.normal(size=(10, 32))
    tight = density_ratio(centres[y] + 0.01 * rng.normal(size=(80, 32)), y)
    loose = density_ratio(centres[y] + 2.0 * rng.normal(size=(80, 32)), y)
    assert tight["pi_ratio"] < 0.01 < loose["pi_ratio"]


def test_density_ratio_scales_to_many_classes() -> None:
    # SOP-like class count: an N x N matrix here would need ~29 GB.
    rng = np.random.default_rng(10)
    n, classes = 60_000, 20_000
    y = rng.integers(0, classes, size=n)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    out = density_ratio(x, y)
    # Random directions: cosine distances average ~1 both within and between classes.
    assert out["pi_inter"] == pytest.approx(1.0, abs=0.01)
    assert out["pi_intra"] == pytest.approx(1.0, abs=0.05)


def test_one_class_is_an_error() -> None:
    with pytest.raises(DataError, match="at least 2 classes"):
        density_ratio(np.random.default_rng(0).normal(size=(6, 3)), np.zeros(6, dtype=np.int64))


def test_only_singletons_is_an_error() -> None:
    with pytest.raises(DataError, match="at least 2 samples"):
        density_ratio(np.random.default_rng(0).normal(size=(4, 3)), np.arange(4))


@pytest.mark.parametrize("x, y, match", [
    (np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([0, 0, 1, 1]), "row 1"),
    (np.ones((4, 2)), np.array([0, 0, 1]), "labels must have shape"),
    (np.ones((4, 2)), np.array([0.0, 0.0, 1.0, 1.0]), "integers"),
    (np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), np.array([0, 0, 1, 1]), r"class\(es\) \[0\]"),
    (np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [1.0, 0.0]]), np.array([0, 0, 1, 1]), "collapsed"),
])
def test_density_ratio_bad_input(x: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        density_ratio(x, y)


def test_spectral_decays_leaves_out_modes_beyond_the_spectrum() -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 4 singular values
    out = spectral_decays(x, modes=(-1, 1, 2, 10))
    assert set(out) == {"rho@-1", "rho@1", "rho@2", "rank"}
    assert out["rho@2"] == pytest.approx(spectral_decay(x, 2))
    with pytest.raises(DataError, match="mode 10 needs at least 10"):
        spectral_decay(x, 10)
