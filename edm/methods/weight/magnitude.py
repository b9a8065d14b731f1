"""Magnitude pruning (layer-wise): zero the smallest |W| of each targeted layer. No calibration.

As in Wanda's magnitude baseline (spec §3.4) the comparison group is the whole matrix, not a row;
N:M patterns compare |W| inside each group of M consecutive inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from edm.methods.weight.base_layerwise import LayerwisePruning
from edm.methods.weight.base_weight import write_weight
from edm.methods.weight.masks import global_mask, nm_mask


def magnitude_prune(
    W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Pure kernel: W [rows, cols] -> fp32 copy with the smallest-magnitude weights zeroed."""
    W = W.detach().float().clone()
    score = W.abs()
    mask = nm_mask(score, *nm) if nm else global_mask(score, sparsity)
    return W.masked_fill_(mask, 0.0)


class Magnitude(LayerwisePruning):
    """Layer-wise magnitude pruning. Takes the shared arguments of :class:`LayerwisePruning`;
    calibration-related ones (weighting, num_groups, calibration) are accepted and unused."""

    needs_calib = False

    def __init__(self, sparsity: float, name: str = "magnitude", **kwargs):
        super().__init__(sparsity, name=name, **kwargs)

    def prune_layer(self, name: str, module: nn.Module, stat) -> None:
        write_weight(module, magnitude_prune(module.weight, self.sparsity, self.nm))
