"""Pure-kernel checks of weight pruning (spec §4 items 1-3): timestep weights, Hessian
accumulation, the OBS solver, masks and DSnoT's swap loop. No pipeline, no diffusers."""

from __future__ import annotations

import pytest
import torch

from edm.errors import ConfigError
from edm.methods.weight.calibrate import split_packages
from edm.methods.weight.dsnot import dsnot_mask, obs_saliency
from edm.methods.weight.hessian import (
    WEIGHTINGS,
    DSnoTStat,
    HessianStat,
    InputNormStat,
    timestep_weights,
)
from edm.methods.weight.magnitude import magnitude_prune
from edm.methods.weight.masks import (
    check_pattern_sparsity,
    global_mask,
    is_nm_sparse,
    nm_mask,
    row_mask,
)
from edm.methods.weight.obs import hinv_cholesky, obs_prune
from edm.methods.weight.wanda import wanda_prune

# spec §2.2 reference values
REF_T25 = [
    1.2000,
    1.1949,
    1.1896,
    1.1841,
    1.1783,
    1.1723,
    1.1659,
    1.1592,
    1.1521,
    1.1445,
    1.1365,
    1.1279,
    1.1187,
    1.1088,
    1.0980,
    1.0861,
    1.0730,
    1.0584,
    1.0418,
    1.0227,
    1.0000,
    0.9723,
    0.9365,
    0.8861,
    0.8000,
]
REF_T10 = [1.2, 1.1817, 1.1612, 1.1380, 1.1113, 1.0796, 1.0408, 0.9908, 0.9204, 0.8]


def test_log_decrease_reproduces_reference_vectors():
    w25 = timestep_weights("log_decrease", 25)
    assert torch.allclose(w25, torch.tensor(REF_T25, dtype=torch.float64), atol=6e-5)
    assert w25[0] == pytest.approx(1.2) and w25[-1] == pytest.approx(0.8)
    assert w25[20] == pytest.approx(1.0, abs=1e-12)  # ln(5)/ln(25) = 1/2 exactly
    assert torch.allclose(
        timestep_weights("log_decrease", 10), torch.tensor(REF_T10, dtype=torch.float64), atol=6e-5
    )


def test_other_weightings():
    T = 7
    assert torch.equal(timestep_weights("uniform", T), torch.ones(T, dtype=torch.float64))
    inc, dec = timestep_weights("linear_increase", T), timestep_weights("linear_decrease", T)
    assert inc[0] == pytest.approx(0.8) and inc[-1] == pytest.approx(1.2)
    assert torch.allclose(dec, inc.flip(0))
    assert torch.allclose(
        timestep_weights("log_increase", T), timestep_weights("log_decrease", T).flip(0)
    )
    for s in WEIGHTINGS:
        assert timestep_weights(s, 1).shape == (1,)
    with pytest.raises(ValueError):
        timestep_weights("cosine", T)


def test_hessian_matches_closed_form():
    """H = 2 / sum(alpha_t b_t) * sum(alpha_t X_t X_t^T), whatever the batch split (spec §4.2)."""
    g = torch.Generator().manual_seed(0)
    d = 6
    calls = [
        (torch.randn(b, n, d, generator=g), a)
        for b, n, a in [(2, 5, 1.2), (4, 3, 1.0), (2, 7, 0.8), (1, 4, 1.1)]
    ]
    stat = HessianStat(d)
    for x, a in calls:
        stat.update(x, a)
    num = sum(a * x.reshape(-1, d).double().T @ x.reshape(-1, d).double() for x, a in calls)
    den = sum(a * x.shape[0] for x, a in calls)
    assert stat.weight_sum == pytest.approx(den)
    assert torch.allclose(stat.H.double(), 2 * num / den, rtol=1e-5, atol=1e-6)
    # a 2-D input [tokens, d] counts as one sample, like the reference code
    s2 = HessianStat(d)
    s2.update(calls[0][0][0], 1.0)
    assert s2.weight_sum == 1.0
    # Wanda's statistic is diag(H)/2 of the same calls
    norm = InputNormStat(d)
    for x, a in calls:
        norm.update(x, a)
    assert torch.allclose(norm.sq_norm, torch.diagonal(stat.H) / 2, rtol=1e-5)


def test_dsnot_stat_moments():
    g = torch.Generator().manual_seed(1)
    calls = [
        (torch.randn(2, 5, 3, generator=g) + 1.0, 1.2),
        (torch.randn(2, 5, 3, generator=g), 0.8),
    ]
    st = DSnoTStat(3)
    for x, a in calls:
        st.update(x, a)
    toks = [(x.reshape(-1, 3), a) for x, a in calls]
    wsum = sum(a * t.shape[0] for t, a in toks)
    mean = sum(a * t.sum(0) for t, a in toks) / wsum
    var = sum(a * (t**2).sum(0) for t, a in toks) / wsum - mean**2
    per_sample = sum(a * t.sum(0) for t, a in toks) / sum(a * 2 for _, a in calls)
    assert torch.allclose(st.mean, mean, atol=1e-5)
    assert torch.allclose(st.var, var, atol=1e-5)
    assert torch.allclose(st.sum_per_sample, per_sample, atol=1e-5)


def _correlated(seed: int, n: int = 1024, d: int = 256, rows: int = 96):
    """Correlated inputs with uneven feature scales (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.exp(torch.randn(d, generator=g))
    X = (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)) * scales
    W = torch.randn(rows, d, generator=g)
    H = HessianStat(d)
    H.update(X.unsqueeze(0))
    return X, W, H.H


def _rel_err(X, W, W_hat):
    return float((X @ W.T - X @ W_hat.T).norm() / (X @ W.T).norm())


def test_hinv_cholesky_factor():
    _, _, H = _correlated(0, d=32, rows=4)
    U = hinv_cholesky(H, 0.01)
    damp = 0.01 * torch.diagonal(H).mean()
    ref = torch.linalg.inv(H.double() + damp * torch.eye(32, dtype=torch.float64))
    assert torch.allclose((U.T @ U).double(), ref, rtol=1e-3, atol=1e-6)
    assert torch.equal(U, U.triu())


def test_obs_unstructured_exact_per_block_and_mask():
    _, W, H = _correlated(0, d=384)
    W_hat, mask = obs_prune(W, H, 0.5, blocksize=128)
    assert W_hat.dtype == torch.float32 and W_hat.shape == W.shape
    for i in range(0, 384, 128):
        assert int((W_hat[:, i : i + 128] == 0).sum()) == W.shape[0] * 128 // 2
    assert torch.equal(W_hat == 0, mask)
    assert not torch.equal(W_hat[~mask], W[~mask])  # kept weights were compensated


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_obs_nm_exact(n, m):
    _, W, H = _correlated(1, d=256)
    W_hat, mask = obs_prune(W, H, 0.5, prunen=n, prunem=m)
    zeros = (W_hat == 0).reshape(W.shape[0], -1, m).sum(-1)
    assert bool((zeros == n).all())
    assert is_nm_sparse(W_hat, n, m)
    assert torch.equal(W_hat == 0, mask)


def test_obs_beats_wanda_beats_magnitude_on_correlated_inputs():
    """Spec §4.3: reconstruction error OBS < Wanda < magnitude, averaged over seeds."""
    errs = {"obs": [], "wanda": [], "magnitude": []}
    for seed in range(4):
        X, W, H = _correlated(seed)
        errs["obs"].append(_rel_err(X, W, obs_prune(W, H, 0.5)[0]))
        errs["wanda"].append(_rel_err(X, W, wanda_prune(W, torch.diagonal(H) / 2, 0.5)))
        errs["magnitude"].append(_rel_err(X, W, magnitude_prune(W, 0.5)))
    mean = {k: sum(v) / len(v) for k, v in errs.items()}
    assert mean["obs"] < mean["wanda"] < mean["magnitude"], mean


def test_obs_dead_columns_and_dtype_independence():
    X, W, _ = _correlated(2, d=64, rows=8)
    X[:, 5] = 0  # an input that is never active
    H = HessianStat(64)
    H.update(X.unsqueeze(0))
    W_hat, _ = obs_prune(W.to(torch.bfloat16), H.H, 0.5)
    assert torch.isfinite(W_hat).all()
    assert bool((W_hat[:, 5] == 0).all())


def test_masks_exact_counts():
    s = torch.randn(10, 40)
    assert int(global_mask(s, 0.3).sum()) == int(400 * 0.3)
    assert bool((row_mask(s, 0.25).sum(1) == 10).all())
    # cols * sparsity fractional (16 * 0.3 = 4.8): the layer still prunes int(numel * 0.3),
    # rows prune 4 or 5 and every row prunes its lowest scores
    s16 = torch.randn(32, 16)
    m16 = row_mask(s16, 0.3)
    assert int(m16.sum()) == int(32 * 16 * 0.3)
    assert set(m16.sum(1).tolist()) == {4, 5}
    kept_min = s16.masked_fill(m16, float("inf")).min(1).values
    pruned_max = s16.masked_fill(~m16, float("-inf")).max(1).values
    assert bool((pruned_max <= kept_min).all())
    m = nm_mask(s, 2, 4)
    assert bool((m.reshape(10, 10, 4).sum(-1) == 2).all())
    # lowest scores are the pruned ones inside each group
    g = s.reshape(10, 10, 4)
    assert bool(
        (
            g[m.reshape(10, 10, 4)].reshape(10, 10, 2).max(-1).values
            <= g[~m.reshape(10, 10, 4)].reshape(10, 10, 2).min(-1).values
        ).all()
    )
    ties = torch.zeros(4, 8)
    assert int(global_mask(ties, 0.5).sum()) == 16  # exact count even when all scores tie


def test_nm_needs_half_sparsity():
    check_pattern_sparsity("2:4", 0.5)
    with pytest.raises(ConfigError) as e:
        check_pattern_sparsity("2:4", 0.6)
    assert e.value.key == "method.sparsity"
    with pytest.raises(ConfigError) as e:
        check_pattern_sparsity("3:7", 0.5)
    assert e.value.key == "method.pattern"


def test_dsnot_swaps_keep_counts_and_reduce_error():
    X, W, _ = _correlated(3, d=128, rows=32)
    X = X + 0.5  # a non-zero input mean gives DSnoT something to cancel
    st = DSnoTStat(128)
    st.update(X.unsqueeze(0))
    init = obs_saliency(W, st.H)
    wanda = W.abs() * st.sq_norm.sqrt()
    args = (W, init, wanda, st.sum_per_sample, st.var, 0.5)
    mask0 = row_mask(init, 0.5)
    mask = dsnot_mask(*args, update_threshold=0.0)
    assert bool((mask.sum(1) == 64).all())
    assert not torch.equal(mask, mask0)  # it did swap something
    D = W * st.sum_per_sample
    assert float((D * mask).sum(1).abs().mean()) < float((D * mask0).sum(1).abs().mean())
    assert torch.equal(dsnot_mask(*args, max_cycle_time=0), mask0)
    mask_nm = dsnot_mask(*args, nm=(2, 4), update_threshold=0.0)
    assert bool((mask_nm.reshape(32, -1, 4).sum(-1) == 2).all())


def test_split_packages_contiguous_near_equal():
    units = list(range(10))
    pk = split_packages(units, 4)
    assert pk == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split_packages(units, 1) == [units]
    assert len(split_packages(units[:2], 4)) == 2
    with pytest.raises(ConfigError):
        split_packages(units, 0)
