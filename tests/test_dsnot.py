"""DSnoT's swap loop against a per-row transcription of the official algorithm
(``zyxxmu/DSnoT`` ``lib/prune.py::prune_DSnoT``, unstructured branch), including layers whose
``cols * sparsity`` is fractional, where rows start from different pruned counts."""

from __future__ import annotations

import pytest
import torch

from edm.methods.weight.dsnot import dsnot_mask
from edm.methods.weight.masks import row_mask


def _official_row(D, regrow_key, wanda, mask0, max_cycle_time, update_threshold):
    """One row of the official loop, written as a plain Python loop.

    The official code runs all rows in lockstep with fixed-length index lists (every row prunes
    ``sparsity_num``); here the row's lists are built from its own initial mask, so a row that
    starts with one more pruned weight has one entry fewer in its prune list. Two guards the
    official code does not need on LLM-sized layers (its lists never run out in 50 cycles) are
    the project's convention, so they are mirrored and counted: a pointer past either end of its
    list stays on the end entry, and a swap happens only when the regrow candidate is pruned and
    the prune candidate is kept (otherwise the row stays as it is). Returns (mask, guard hits).
    """
    cols = D.numel()
    mask = mask0.clone()
    n_kept = int((~mask).sum())
    regrow_order = torch.sort(regrow_key, stable=True).indices.tolist()
    # wanda_res_indices, then return_reorder_indice: D <= 0 in list order, then D > 0 reversed
    kept = torch.sort(wanda.masked_fill(mask, float("inf")), stable=True).indices[:n_kept]
    kept = kept.tolist()
    prune_order = [j for j in kept if not D[j] > 0] + [j for j in reversed(kept) if D[j] > 0]
    err = (D * mask).sum()
    sign0 = torch.sign(err)
    r_lo, r_hi, p_lo, p_hi = 0, cols - 1, 0, n_kept - 1
    hits = 0
    if n_kept == 0:
        return mask, hits
    for _ in range(max_cycle_time):
        if err > 0:  # regrow from the large end
            r, r_hi = regrow_order[min(max(r_hi, 0), cols - 1)], r_hi - 1
        else:
            r, r_lo = regrow_order[min(max(r_lo, 0), cols - 1)], r_lo + 1
        if err < 0:  # prune a positive-D weight
            p, p_hi = prune_order[min(max(p_hi, 0), n_kept - 1)], p_hi - 1
        else:
            p, p_lo = prune_order[min(max(p_lo, 0), n_kept - 1)], p_lo + 1
        after = err + D[p] - D[r]
        if not (err.abs() > update_threshold and torch.sign(after) == sign0):
            break  # update_mask goes False for good
        if bool(mask[r]) and not bool(mask[p]):
            mask[p], mask[r] = True, False
            err = after
        else:
            hits += 1
    return mask, hits


def _reference(W, init, wanda, sum_x, var_x, sparsity, max_cycle_time, update_threshold, pw=1.0):
    mask0 = row_mask(init, sparsity)
    D = W.float() * sum_x.float().unsqueeze(0)
    key = torch.where(mask0, D, torch.zeros_like(D))
    if pw:
        key = key / var_x.float().clamp_min(1e-12).pow(pw)
    rows = [
        _official_row(D[r], key[r], wanda[r], mask0[r], max_cycle_time, update_threshold)
        for r in range(W.shape[0])
    ]
    return mask0, torch.stack([m for m, _ in rows]), sum(h for _, h in rows)


def _inputs(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    sum_x = torch.randn(cols, generator=g) + 0.3
    var_x = torch.rand(cols, generator=g) + 0.5
    init = torch.rand(rows, cols, generator=g)
    wanda = torch.rand(rows, cols, generator=g)
    return W, init, wanda, sum_x, var_x


@pytest.mark.parametrize(
    "rows,cols,sparsity,cycles,thr,seed",
    [
        # 4.5 per row: rows prune 4 or 5, lists run out. Row 0 prunes 5 (seed 0) or 4 (seed 1):
        # a single list length taken from row 0 was wrong for the other rows either way.
        (24, 10, 0.45, 50, 0.0, 0),
        (24, 10, 0.45, 50, 0.1, 1),
        (16, 130, 0.45, 20, 0.0, 2),  # 58.5 per row; 20 cycles never exhaust a list
        (8, 1536, 0.6, 50, 0.1, 0),  # 921.6 per row, an SD3-sized layer
        (12, 64, 0.5, 50, 0.0, 0),  # integer count: every row the same
    ],
)
def test_dsnot_matches_per_row_official_loop(rows, cols, sparsity, cycles, thr, seed):
    args = _inputs(rows, cols, seed)
    mask0, ref, hits = _reference(*args, sparsity, cycles, thr)
    got = dsnot_mask(*args, sparsity, max_cycle_time=cycles, update_threshold=thr)
    assert torch.equal(got, ref)
    # each row keeps the count it started with; fractional layers start from two counts
    assert torch.equal(got.sum(1), mask0.sum(1))
    counts = set(mask0.sum(1).tolist())
    base = int(cols * sparsity)
    assert counts == ({base, base + 1} if cols * sparsity != base else {base})
    assert int(mask0.sum()) == int(rows * cols * sparsity)
    assert not torch.equal(got, mask0)  # the loop did swap
    if cols >= 130:
        assert hits == 0  # guards never fired: this is the official loop exactly


def test_dsnot_fractional_rows_never_swap_in_padding():
    """A row that starts with one more pruned weight has a shorter prune list; with the layer's
    single list length it would offer one of its own pruned weights as a prune candidate."""
    for seed in range(20):
        args = _inputs(6, 10, seed)
        mask0 = row_mask(args[1], 0.45)
        got = dsnot_mask(*args, 0.45, update_threshold=0.0)
        assert torch.equal(got.sum(1), mask0.sum(1))
        assert torch.equal(got, _reference(*args, 0.45, 50, 0.0)[1])
