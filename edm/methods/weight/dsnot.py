"""DSnoT (Zhang et al., ICLR 2024; spec §3.5) as the OBS-Diff paper runs it: start from the
Hessian-based (SparseGPT) mask, then training-free prune-and-regrow swaps per output row.

Removing w_rj shifts output r by w_rj * E[sum_tokens x_j] per sample (``D``). Each row keeps its
accumulated shift ``err = sum_{pruned j} D_rj`` and repeatedly (i) regrows the pruned weight whose
D, divided by Var[x_j]^p, best cancels err (largest if err > 0, smallest if err < 0) and
(ii) prunes a kept weight: unstructured, the least Wanda-important kept weight whose D has the sign that also
reduces err; N:M, the kept weight of the regrown weight's M-group with the lowest initial score.
A row stops when |err| <= update_threshold, when a swap would flip err's sign, or after
``max_cycle_time`` swaps. No weight update: DSnoT only moves the mask.
"""

from __future__ import annotations

import torch
from torch import nn

from edm.errors import ConfigError
from edm.methods.weight.base_layerwise import LayerwisePruning
from edm.methods.weight.base_weight import write_weight
from edm.methods.weight.hessian import DSnoTStat
from edm.methods.weight.masks import nm_mask, row_mask
from edm.methods.weight.obs import hinv_cholesky, prepare_hessian


def obs_saliency(W: torch.Tensor, H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT's score ``w^2 / diag(U)^2`` with U the upper Cholesky of H^-1 (no update)."""
    W, H, _ = prepare_hessian(W, H)
    d = torch.diagonal(hinv_cholesky(H, percdamp))
    return W.square() / d.square().unsqueeze(0)


@torch.no_grad()
def dsnot_mask(
    W: torch.Tensor,
    init_score: torch.Tensor,
    wanda_score: torch.Tensor,
    sum_x: torch.Tensor,
    var_x: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
) -> torch.Tensor:
    """Pure kernel. Returns the final prune mask [rows, cols] (True = prune).

    Args:
        W: [rows, cols] weight. init_score / wanda_score: [rows, cols], lower = less important.
        sum_x: [cols] per-sample sum over tokens of x_j (mean over samples). var_x: [cols].
        sparsity: unstructured fraction, initial mask by :func:`row_mask` (a row prunes
            ``int(cols * sparsity)`` or one more; swaps keep each row's own count); ignored for
            N:M (``nm`` = (n, m)).
    """
    W = W.float()
    rows, cols = W.shape
    ar = torch.arange(rows, device=W.device).unsqueeze(1)
    mask = nm_mask(init_score, *nm) if nm else row_mask(init_score, sparsity)
    # Per row: when cols * sparsity is fractional, row_mask prunes base or base + 1 per row.
    n_pruned = mask.sum(1, keepdim=True)
    if not bool(((n_pruned > 0) & (n_pruned < cols)).any()):
        return mask
    D = W * sum_x.float().unsqueeze(0)
    err = (D * mask).sum(1, keepdim=True)
    sign0 = torch.sign(err)
    regrow_key = torch.where(mask, D, torch.zeros_like(D))
    if pow_of_var_regrowing:
        regrow_key = regrow_key / var_x.float().clamp_min(1e-12).pow(pow_of_var_regrowing)
    regrow_order = torch.sort(regrow_key, dim=1, stable=True).indices
    r_ptr = torch.stack(
        [
            torch.zeros(rows, dtype=torch.long, device=W.device),
            torch.full((rows,), cols - 1, device=W.device),
        ],
        1,
    )
    if nm is None:
        # Kept weights by Wanda importance; negatives (in ascending importance) first, then
        # positives in descending importance, so both ends hold the least important of a sign.
        # Rows keep different counts, so each row's list is its first n_kept entries; the
        # padding (that row's pruned weights) sorts after them and is never a candidate.
        n_kept = cols - n_pruned
        width = int(n_kept.max())
        kept = torch.sort(wanda_score.masked_fill(mask, float("inf")), dim=1, stable=True).indices
        kept = kept[:, :width]
        pos = torch.arange(width, device=W.device).expand(rows, -1)
        key = torch.where(D.gather(1, kept) > 0, 2 * width - pos, pos)
        key = key.masked_fill(pos >= n_kept, 3 * width)
        prune_order = kept.gather(1, torch.sort(key, dim=1, stable=True).indices)
        p_ptr = torch.cat([torch.zeros_like(n_kept), n_kept - 1], 1)
        p_last = (n_kept - 1).clamp_min(0)
    else:
        m = nm[1]
        init_left = init_score.float().masked_fill(mask, float("inf"))
        used = init_left.masked_fill(mask, 0).max() + 1  # larger than any kept score
    active = n_pruned < cols  # a fully pruned row has nothing left to prune
    for _ in range(max_cycle_time):
        if not bool(active.any()):
            break
        up = (err > 0).long()  # regrow from the large end when err > 0
        regrow = regrow_order.gather(1, r_ptr.gather(1, up).clamp(0, cols - 1))
        r_ptr.scatter_add_(1, up, 1 - 2 * up)  # low end moves right, high end moves left
        if nm is None:
            down = (err < 0).long()  # err < 0: prune a positive-D weight (high end)
            at = torch.minimum(p_ptr.gather(1, down).clamp_min(0), p_last)
            prune = prune_order.gather(1, at)
            p_ptr.scatter_add_(1, down, 1 - 2 * down)
        else:
            start = regrow - regrow % m
            group = (start + torch.arange(m, device=W.device)).clamp_max(cols - 1)
            prune = start + init_left.gather(1, group).argmin(1, keepdim=True)
        Dr, Dp = D.gather(1, regrow), D.gather(1, prune)
        after = err + Dp - Dr
        active &= (err.abs() > update_threshold) & (torch.sign(after) == sign0)
        ok = active & mask.gather(1, regrow) & ~mask.gather(1, prune)
        rr, pr = regrow[ok.squeeze(1)], prune[ok.squeeze(1)]
        rix = ar[ok.squeeze(1)]
        mask[rix, pr] = True
        mask[rix, rr] = False
        err = torch.where(ok, after, err)
        if nm is not None:
            init_left[rix, pr] = used  # a weight pruned by a swap is not a candidate again
    return mask


class DSnoT(LayerwisePruning):
    """DSnoT with a Hessian-score start (shared args: :class:`LayerwisePruning`).

    Args:
        max_cycle_time: swaps per row at most (50).
        update_threshold: stop a row when its |err| falls below this (0.1, in output units per
            sample; the reference value was tuned for LLMs).
        pow_of_var_regrowing: exponent of Var[x] dividing the regrow score (1).
        percdamp: damping of the Hessian for the initial score (0.01).
    """

    def __init__(
        self,
        sparsity: float,
        max_cycle_time: int = 50,
        update_threshold: float = 0.1,
        pow_of_var_regrowing: float = 1.0,
        percdamp: float = 0.01,
        name: str = "dsnot",
        **kwargs,
    ):
        super().__init__(sparsity, name=name, **kwargs)
        if int(max_cycle_time) < 0:
            raise ConfigError("method.max_cycle_time", f"must be >= 0, got {max_cycle_time}.")
        if float(update_threshold) < 0:
            raise ConfigError("method.update_threshold", f"must be >= 0, got {update_threshold}.")
        if not float(percdamp) > 0:
            raise ConfigError("method.percdamp", f"must be > 0, got {percdamp}.")
        self.max_cycle_time, self.update_threshold = int(max_cycle_time), float(update_threshold)
        self.pow_of_var_regrowing, self.percdamp = float(pow_of_var_regrowing), float(percdamp)

    def make_stat(self, name: str, module: nn.Module):
        return DSnoTStat(module.in_features, device=module.weight.device)

    def prune_layer(self, name: str, module: nn.Module, stat) -> None:
        W = module.weight.detach().float()
        wanda = W.abs() * stat.sq_norm.sqrt().unsqueeze(0)
        init = obs_saliency(W, stat.H, self.percdamp)
        mask = dsnot_mask(
            W,
            init,
            wanda,
            stat.sum_per_sample,
            stat.var,
            self.sparsity,
            self.nm,
            self.max_cycle_time,
            self.update_threshold,
            self.pow_of_var_regrowing,
        )
        stat.free()
        write_weight(module, W.masked_fill(mask, 0.0))
