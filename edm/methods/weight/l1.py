"""L1-norm structured pruning (Li et al., ICLR 2017), the structured baseline of OBS-Diff (spec §3.6).

Attention heads and FFN neurons -- the same targets as structured OBS-Diff -- are ranked by the
L1 norm of their weights, the lowest are removed without any compensation, and the layers are
physically sliced. No calibration data is needed.

Which weights: Li et al. score a filter by its own weights, i.e. the *producer* rows that compute
the channel (``to_q/k/v`` rows of a head, including MMDiT's ``add_q/k/v_proj``; the
``ff.net.0.proj`` row(s) of a neuron, both GEGLU halves). ``score_on=consumer`` uses the columns of
the output projection instead (the Hessian-free analogue of OBS's Eq. 6 score); ``both`` sums them.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch

from edm.errors import ConfigError, NothingPatchedError
from edm.families import adapter
from edm.methods.base import ApplyContext, MethodReport
from edm.methods.weight.base_weight import PruningMethod, _peak_memory_gb
from edm.methods.weight.slicing import (
    StructuredTarget,
    count_params,
    finish,
    mask_target,
    structured_targets,
    target_weight_count,
)

log = logging.getLogger(__name__)

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
            cols = lin.weight.detach().abs().float().sum(0).cpu()  # [in_features]
            score += cols.view(n, g).sum(1)
    return score


class L1Norm(PruningMethod):
    """L1-norm structured baseline. Shared arguments: :class:`PruningMethod` (``sparsity``,
    ``targets``, ``name``, ``tag``; calibration arguments are ignored: no data needed).

    Args:
        sparsity: fraction of heads / FFN neurons removed in every targeted module
            (``round(n * sparsity)``, at least one kept), as structured OBS-Diff.
        exclude_first_last: skip the first and last transformer layers; ``None`` (default) as
            OBS-Diff's tables: excluded for MMDiT, included for UNets (see
            :func:`edm.methods.weight.slicing.resolve_exclude_first_last`).
        score_on: ``producer`` (Li et al.: the channel's own weights, default), ``consumer``
            (output-projection columns) or ``both``.
        save: write the sliced denoiser to ``<output_dir>/pruned_model`` (safetensors + json),
            reloadable with ``model.pruned_from=<that dir>``.
    """

    needs_calibration: ClassVar[bool] = False
    needs_calib = False  # the runner skips calib.check() for methods that need no prompts

    def __init__(
        self,
        sparsity: float,
        exclude_first_last: bool | None = None,
        score_on: str = "producer",
        save: bool = True,
        name: str = "l1",
        **kwargs,
    ):
        if kwargs.get("keep_backup"):
            raise ConfigError("method.keep_backup", "structured pruning changes shapes; reload "
                              "the model instead of undoing it.", [False])
        super().__init__(sparsity, name=name, **kwargs)
        if score_on not in SCORE_ON:
            raise ConfigError("method.score_on", f"unknown {score_on!r}.", SCORE_ON)
        self.exclude_first_last = exclude_first_last
        self.score_on = score_on
        self.save = bool(save)

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        denoiser = adapter(pipe).denoiser(pipe)
        targets = structured_targets(denoiser, ctx.family, self.exclude_first_last, self.targets)
        if not targets:
            raise NothingPatchedError(f"<method={self.name}> found no heads / FFN to prune "
                                      f"(targets={list(self.targets)})")
        t0 = time.perf_counter()
        params_before, weights_before = count_params(denoiser), target_weight_count(targets)
        results = []
        for t in targets:
            k = t.num_to_prune(self.sparsity)
            pruned = torch.argsort(l1_scores(t, self.score_on))[:k].tolist()
            mask_target(t, pruned)
            results.append({"name": t.name, "kind": t.kind, "groups": t.num_groups, "pruned": k})
        details = finish(denoiser, targets, results, params_before, weights_before, do_slice=True)
        if self.save:
            from edm.methods.weight.io import save_to_run

            details["saved_to"] = save_to_run(denoiser, ctx, {"method": self.name,
                                                             "sparsity": self.sparsity})
        return structured_report(self.name, self.kind, details, time.perf_counter() - t0,
                                 next(denoiser.parameters()).device)


def structured_report(name, kind, details, seconds, device, calib_seconds: float = 0.0):
    """MethodReport of a structured method from :func:`slicing.finish` details."""
    peak_gb, peak_src = _peak_memory_gb(device)
    before, after = details["params_before"], details["params_after"]
    metrics = {
        "sparsity": details["sparsity"],
        "params_before": float(before),
        "params_after": float(after),
        "param_reduction": 1.0 - after / before,
        "calib_seconds": calib_seconds,
        "solve_seconds": seconds - calib_seconds,
        "prune_seconds": seconds,
        "peak_mem_gb": peak_gb,
    }
    details = dict(details, peak_mem_source=peak_src, granularity="structured")
    return MethodReport(name=name, kind=kind, patched=details["patched"],
                        sparsity=details["sparsity"], metrics=metrics, details=details)
