"""Structured pruning (L1, structured OBS-Diff): remove whole attention heads and FFN neurons, then
slice the layers physically, so the model gets smaller and faster, not only sparser.

A subclass writes one thing, :meth:`StructuredPruning.choose`: which groups of one target go, and
how the surviving weights change (OBS compensation, or none). The rest is shared: the targets
(:func:`edm.methods.weight.slicing.structured_targets`, forward order from the family adapter),
their consumer layers as basic units for the package loop of
:class:`~edm.methods.weight.base_weight.PruningMethod` (calibrated only if ``needs_calib``),
slicing, saving (shapes changed, so the run's pruned model is written for
``model.pruned_from``) and the report.
"""

from __future__ import annotations

import time
from typing import Any

from edm.errors import ConfigError, NothingPatchedError
from edm.eval.flops import count_params
from edm.families import METHOD_FAMILIES, adapter
from edm.methods.base import ApplyContext, MethodReport
from edm.methods.weight.base_weight import PruningMethod, build_report, param_change
from edm.methods.weight.calibrate import Unit
from edm.methods.weight.io import save_to_run
from edm.methods.weight.slicing import (
    StructuredTarget,
    finish,
    structured_targets,
    structured_units,
    target_weight_count,
)
from edm.perf import reset_peak_memory


class StructuredPruning(PruningMethod):
    """Base of the structured pruners. Shared arguments: :class:`PruningMethod`.

    Args:
        sparsity: fraction of heads / FFN neurons removed in every targeted module
            (``round(n * sparsity)``, at least one kept).
        exclude_first_last: skip the first and last transformer layers; ``None`` (default) as
            OBS-Diff's tables: excluded for MMDiT and FLUX, included for UNets (see
            :func:`edm.methods.weight.slicing.resolve_exclude_first_last`).
        save: write the sliced denoiser to ``<output_dir>/pruned_model`` (safetensors + json),
            reloadable with ``model.pruned_from=<that dir>``.
    """

    # Heads and FFN neurons of every block type the slicing knows: UNet, MMDiT and FLUX.1
    # (double-stream = MMDiT joint blocks; single-stream heads and MLP neurons share proj_out).
    supported_families = (*METHOD_FAMILIES, "flux")

    def __init__(self, sparsity: float, exclude_first_last: bool | None = None,
                 save: bool = True, **kwargs):
        if kwargs.get("keep_backup"):
            raise ConfigError("method.keep_backup", "structured pruning changes shapes; reload "
                              "the model instead of undoing it.", [False])
        super().__init__(sparsity, **kwargs)
        self.exclude_first_last = None if exclude_first_last is None else bool(exclude_first_last)
        self.save = bool(save)

    def choose(self, target: StructuredTarget, stats: dict[str, Any]) -> dict:
        """Remove ``target.num_to_prune(sparsity)`` groups of ``target`` on its consumers, in
        place: zero their columns (slicing happens later, for all targets at once), change the
        surviving weights if the method compensates, and set ``target.pruned``.

        Args:
            stats: calibration statistics of the current package by layer name (every consumer
                of ``target`` is in it when ``needs_calib``; empty otherwise).

        Returns:
            ``{"name", "kind", "groups", "pruned": number removed, ...}`` for the report.
        """
        raise NotImplementedError

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        denoiser = adapter(pipe).denoiser(pipe)
        targets = structured_targets(denoiser, ctx.family, self.exclude_first_last, self.targets)
        if not targets:
            raise NothingPatchedError(f"<method={self.name}> found no heads / FFN to prune "
                                      f"(targets={list(self.targets)})")
        device = next(denoiser.parameters()).device
        reset_peak_memory(device)
        params_before, weights_before = count_params(denoiser), target_weight_count(targets)
        owners: dict[str, list[StructuredTarget]] = {}  # FLUX proj_out: heads and MLP targets
        for t in targets:
            for n, _ in t.consumers:
                owners.setdefault(n, []).append(t)
        results: list[dict] = []

        def prune_unit(unit: Unit, stats: dict[str, Any]) -> None:
            # an MMDiT FFN unit holds two targets (image and text FFN), a FLUX single-stream
            # proj_out two (heads, then MLP neurons): each once, in forward order
            for t in dict.fromkeys(t for n, _ in unit for t in owners[n]):
                results.append(self.choose(t, stats))

        run = self.prune_packages(pipe, ctx, structured_units(targets), prune_unit)
        t0 = time.perf_counter()
        details = finish(denoiser, targets, results, params_before, weights_before)
        run.solve_seconds += time.perf_counter() - t0  # slicing is part of the solve
        details["granularity"] = "structured"
        if self.save:
            details["saved_to"] = save_to_run(denoiser, ctx, {"method": self.name,
                                                             "sparsity": self.sparsity})
        return build_report(
            self, device, patched=details["patched"], sparsity=details["sparsity"],
            metrics=param_change(details["params_before"], details["params_after"]),
            details=details, run=run,
        )
