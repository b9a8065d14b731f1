"""Layer-wise weight pruning (magnitude, Wanda, SparseGPT, OBS-Diff, DSnoT): every targeted linear
keeps its shape and loses individual weights (unstructured or N:M), solved one layer at a time.

A subclass implements ``prune_layer`` (and ``make_stat`` if its statistic is not the Hessian), or
``prune_unit`` to solve a basic unit jointly; it sets ``needs_calib = False`` if it needs no data.
Target selection (the family adapter's basic units), the package loop and the report are shared.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edm.errors import ConfigError, NothingPatchedError
from edm.families import METHOD_FAMILIES, adapter
from edm.methods.base import ApplyContext, MethodReport
from edm.methods.weight.base_weight import PruningMethod, build_report
from edm.methods.weight.calibrate import Unit
from edm.methods.weight.export import check_export, to_semi_structured
from edm.methods.weight.masks import check_pattern_sparsity, parse_pattern, zero_fraction
from edm.perf import reset_peak_memory


class LayerwisePruning(PruningMethod):
    """Base of the layer-wise pruners. Shared arguments: :class:`PruningMethod`.

    Args:
        pattern: ``unstructured``, ``2:4`` or ``4:8`` (N:M needs sparsity 0.5).
        blocks: ``null`` (all transformer layers) or ``[start, stop)`` layer indices in forward
            order; the paper's 2:4 table prunes SD3.5-Large blocks 3..25 only.
        export: ``null`` (masked dense weights) or ``semi_structured`` (2:4 on CUDA fp16/bf16:
            :mod:`edm.methods.weight.export`, sparse tensor-core kernels).
    """

    # Layer-wise pruning needs only the adapter's linear units and a pipeline call for
    # calibration, which FLUX.1 has (its pipeline batches no CFG halves: one row per prompt).
    supported_families = (*METHOD_FAMILIES, "flux")

    def __init__(self, sparsity: float, pattern: str = "unstructured", blocks=None,
                 export: str | None = None, **kwargs):
        super().__init__(sparsity, **kwargs)
        self.pattern = str(pattern)
        self.nm = parse_pattern(self.pattern)
        check_pattern_sparsity(self.pattern, self.sparsity)
        self.blocks = self._check_blocks(blocks)
        check_export(export, self.pattern)
        self.export = export

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        check_export(self.export, self.pattern, device, dtype)

    @staticmethod
    def _check_blocks(blocks) -> range | None:
        if blocks is None:
            return None
        b = list(blocks)
        if len(b) != 2 or not all(isinstance(v, int) for v in b) or not 0 <= b[0] < b[1]:
            raise ConfigError(
                "method.blocks",
                f"must be null or [start, stop) with 0 <= start < stop, got {blocks}.",
            )
        return range(b[0], b[1])

    # ---- override points -------------------------------------------------------------------
    def prune_unit(self, unit: Unit, stats: dict[str, Any]) -> None:
        """Prune one basic unit in place (default: each layer independently)."""
        for name, module in unit:
            self.prune_layer(name, module, stats.get(name))

    def prune_layer(self, name: str, module: nn.Module, stat) -> None:
        raise NotImplementedError

    # ---- the method ------------------------------------------------------------------------
    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        denoiser = adapter(pipe).denoiser(pipe)
        units = adapter(pipe).linear_units(denoiser, self.targets, self.blocks)
        layers = [layer for unit in units for layer in unit]
        if not layers:
            raise NothingPatchedError(
                f"<method={self.name}> matched no linear layer (targets={list(self.targets)}, "
                f"blocks={self.blocks})"
            )
        self.backup(layers)
        device = next(denoiser.parameters()).device
        reset_peak_memory(device)
        nonzero_before = sum(int((p != 0).sum()) for p in denoiser.parameters())
        run = self.prune_packages(pipe, ctx, units, self.prune_unit)

        zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
        numel = sum(m.weight.numel() for _, m in layers)
        metrics = {
            "params_total": float(sum(p.numel() for p in denoiser.parameters())),
            "params_nonzero_before": float(nonzero_before),
            "params_nonzero_after": float(sum(int((p != 0).sum()) for p in denoiser.parameters())),
            "target_params": float(numel),
        }
        details = {
            "per_layer_sparsity": {name: zero_fraction(m.weight) for name, m in layers},
            "pattern": self.pattern,
            "targets": list(self.targets),
        }
        if self.export == "semi_structured":  # after every count above: they read dense weights
            details["export"] = to_semi_structured(layers)
            metrics["export_converted_layers"] = float(len(details["export"]["converted"]))
        return build_report(self, device, patched=len(layers), sparsity=zeros / numel,
                            metrics=metrics, details=details, run=run)
