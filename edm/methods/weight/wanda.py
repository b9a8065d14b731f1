"""Wanda (Sun et al., ICLR 2024; spec §3.4): score |W_ij| * ||X_j||, pruned per output row.

The input norm is the timestep-weighted running mean over calibration samples of
sum_tokens x_j^2 (``InputNormStat``), i.e. Wanda's ``scaler_row`` with OBS-Diff's weighting, as
the paper's baselines use it. No weight update.
"""

from __future__ import annotations

import torch
from torch import nn

from edm.methods.weight.base_layerwise import LayerwisePruning
from edm.methods.weight.base_weight import write_weight
from edm.methods.weight.hessian import InputNormStat
from edm.methods.weight.masks import nm_mask, row_mask


def wanda_prune(
    W: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Pure kernel. W: [rows, cols]; sq_norm: [cols] (sum_tokens x_j^2 per sample)."""
    W = W.detach().float().clone()
    score = W.abs() * sq_norm.float().sqrt().unsqueeze(0)
    mask = nm_mask(score, *nm) if nm else row_mask(score, sparsity)
    return W.masked_fill_(mask, 0.0)


class Wanda(LayerwisePruning):
    """Wanda with module packages and timestep weighting. Shared arguments:
    :class:`LayerwisePruning`."""

    def __init__(self, sparsity: float, name: str = "wanda", **kwargs):
        super().__init__(sparsity, name=name, **kwargs)

    def make_stat(self, name: str, module: nn.Module):
        return InputNormStat(module.in_features, device=module.weight.device)

    def prune_layer(self, name: str, module: nn.Module, stat) -> None:
        write_weight(module, wanda_prune(module.weight, stat.sq_norm, self.sparsity, self.nm))
