"""L1-norm structured pruning (Li et al., ICLR 2017), the structured baseline of OBS-Diff (spec §3.6).

Attention heads and FFN neurons -- the same targets as structured OBS-Diff -- are ranked by the
L1 norm of their weights, the lowest are removed without any compensation, and the layers are
physically sliced. No calibration data is needed.

Which weights: Li et al. score a filter by its own weights, i.e. the *producer* rows that compute
the channel (``to_q/k/v`` rows of a head, including MMDiT's ``add_q/k/v_proj``; the
``ff.net.0.proj`` row(s) of a neuron, both GEGLU halves). ``score_on=consumer`` uses the columns of
the output projection instead (the Hessian-free analogue of OBS's Eq. 6 score); ``both`` sums them.
On a FLUX single-stream block the consumer is the shared ``proj_out``: a target scores only its
own column range of it (heads: the attention columns, neurons: the MLP columns).
"""

from __future__ import annotations

from typing import Any

import torch

from edm.errors import ConfigError
from edm.methods.weight.base_structured import StructuredPruning
from edm.methods.weight.slicing import StructuredTarget, mask_target

SCORE_ON = ("producer", "consumer", "both")


def l1_scores(target: StructuredTarget, score_on: str = "producer") -> torch.Tensor:
    """L1 norm per group (head or neuron) of ``target``: ``[num_groups]`` float32."""
    n, g = target.num_groups, target.group_size
    score = torch.zeros(n)
    if score_on in ("producer", "both"):
        for _, lin, gated in target.producers:
            rows = lin.weight.detach().abs().float().sum(1).cpu()  # [out_features]
            if gated:  # GEGLU: neuron i owns rows i and i + n
                rows = rows[: n * g] + rows[n * g :]
            score += rows.view(n, g).sum(1)
    if score_on in ("consumer", "both"):
        for _, lin in target.consumers:
            cols = target.consumer_weight(lin).detach().abs().float().sum(0).cpu()  # [n*g]
            score += cols.view(n, g).sum(1)
    return score


class L1Norm(StructuredPruning):
    """L1-norm structured baseline. Shared arguments: :class:`StructuredPruning` (``sparsity``,
    ``targets``, ``exclude_first_last``, ``save``, ``name``, ``tag``); no calibration data.

    Args:
        score_on: ``producer`` (Li et al.: the channel's own weights, default), ``consumer``
            (output-projection columns) or ``both``.
    """

    needs_calib = False  # scores come from the weights alone

    def __init__(self, sparsity: float, score_on: str = "producer", name: str = "l1", **kwargs):
        super().__init__(sparsity, name=name, **kwargs)
        if score_on not in SCORE_ON:
            raise ConfigError("method.score_on", f"unknown {score_on!r}.", SCORE_ON)
        self.score_on = score_on

    def choose(self, target: StructuredTarget, stats: dict[str, Any]) -> dict:
        k = target.num_to_prune(self.sparsity)
        pruned = torch.argsort(l1_scores(target, self.score_on))[:k].tolist()
        mask_target(target, pruned)  # no compensation: the baseline only removes
        return {"name": target.name, "kind": target.kind, "groups": target.num_groups,
                "pruned": k}
