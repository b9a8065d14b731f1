"""Structured OBS-Diff (Zhu et al., ICLR 2026, §4.3; spec §2.4): attention heads and FFN neurons
removed with OBS compensation from the timestep-weighted Hessian, module package by package,
then physically sliced (the paper's Tables 3, 4 and 9).

The choice per target is :func:`obs_prune_target`: the consumer layers' input Hessians rank the
groups (Eq. 6 neurons, Eq. 7 heads; MMDiT / FLUX double-stream joint heads fuse both streams'
rankings) and the kernel of :mod:`edm.methods.weight.structured` compensates the surviving
columns. Targets, packages, slicing and the report come from
:class:`~edm.methods.weight.base_structured.StructuredPruning`.

FLUX single-stream blocks: the heads and the MLP neurons are two targets on one consumer,
``proj_out``, whose Hessian is over all its input columns (attention and MLP). Each target ranks
only its own column range, but is compensated over *all* surviving columns of ``proj_out`` with
that full Hessian (the kernel's ``span``); the second target (MLP, forward order) leaves the
first one's removed heads out (``removed``), so they stay zero. Why the full layer and not the
sub-block: OBS minimises the layer's output error, and the attention and MLP columns feed the
same output, so the best refit after removing a head may use MLP columns; the sub-block solve is
a least-squares fit over fewer columns and can only be worse (see
:mod:`edm.methods.weight.structured`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edm.errors import ConfigError
from edm.methods.weight.base_structured import StructuredPruning
from edm.methods.weight.slicing import StructuredTarget
from edm.methods.weight.structured import obs_prune_heads_joint, obs_prune_structured


def _write(linear: nn.Linear, W: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(W.to(linear.weight.dtype))


def obs_prune_target(
    target: StructuredTarget,
    hessians: dict[str, torch.Tensor],
    sparsity: float,
    percdamp: float = 0.01,
    no_compensate: bool = False,
    rrf_k: int = 60,
) -> dict:
    """Structured OBS on one target, in place on its consumers (dense: columns zeroed).

    Args:
        hessians: input Hessian (fp32) of every consumer, by name.
        sparsity: fraction of heads / neurons to remove (see ``num_to_prune``).
        percdamp, no_compensate, rrf_k: see :mod:`edm.methods.weight.structured`.

    Returns:
        ``{"name", "kind", "groups", "pruned", "score"}``; ``target.pruned`` is set.
    """
    missing = [n for n, _ in target.consumers if n not in hessians]
    if missing:
        raise KeyError(f"structured OBS needs the input Hessians of {missing}")
    k = target.num_to_prune(sparsity)
    Ws = [lin.weight for _, lin in target.consumers]
    Hs = [hessians[n].to(Ws[0].device) for n, _ in target.consumers]
    if k == 0:
        target.pruned = []
        return {"name": target.name, "kind": target.kind, "groups": target.num_groups,
                "pruned": 0, "score": 0.0}
    if len(Ws) > 1:
        assert target.span is None, "joint heads own whole consumers"
        res = obs_prune_heads_joint(Ws, Hs, k, target.group_size, percdamp, no_compensate, rrf_k)
        new = res.W
    else:  # span / removed: None / empty except on a consumer shared with siblings (FLUX)
        res = obs_prune_structured(Ws[0], Hs[0], k, target.group_size, percdamp, no_compensate,
                                   span=target.span, removed=target.removed_columns())
        new = [res.W]
    for (_, lin), W in zip(target.consumers, new):
        _write(lin, W)
    target.pruned = res.pruned.tolist()
    return {"name": target.name, "kind": target.kind, "groups": target.num_groups,
            "pruned": k, "score": res.score}


class OBSDiffStructured(StructuredPruning):
    """Structured OBS-Diff. Shared arguments: :class:`StructuredPruning` and, for the
    calibration (packages, timestep weighting), :class:`~edm.methods.weight.base_weight.PruningMethod`.

    Args:
        percdamp: Hessian damping as a fraction of mean(diag H); 0.01 as the paper.
        no_compensate: remove columns without the OBS weight update (ablation; the ranking still
            uses the Hessian).
        rrf_k: MMDiT only; reciprocal-rank-fusion constant for the joint heads (60).
    """

    def __init__(
        self,
        sparsity: float,
        percdamp: float = 0.01,
        no_compensate: bool = False,
        rrf_k: int = 60,
        name: str = "obs_diff",
        **kwargs,
    ):
        super().__init__(sparsity, name=name, **kwargs)
        if not float(percdamp) > 0:
            raise ConfigError("method.percdamp", f"must be > 0, got {percdamp}.")
        self.percdamp = float(percdamp)
        self.no_compensate = bool(no_compensate)
        self.rrf_k = int(rrf_k)

    def choose(self, target: StructuredTarget, stats: dict[str, Any]) -> dict:
        hessians = {n: stats[n].H for n, _ in target.consumers if n in stats}
        result = obs_prune_target(target, hessians, self.sparsity, self.percdamp,
                                  self.no_compensate, self.rrf_k)
        # this target's Hessians are done; free before the next (a FLUX proj_out's only when
        # its sibling, which needs the same Hessian, has been pruned too)
        if all(s.pruned is not None for s in target.siblings):
            for n, _ in target.consumers:
                if n in stats:
                    stats[n].free()
        return result
