"""Shared machinery of the layer-wise weight-pruning methods (magnitude, Wanda, SparseGPT,
OBS-Diff, DSnoT): target selection through the family adapter, module packages, timestep-weighted
calibration, in-place solve per layer, and a report *measured* from the weights afterwards.

A subclass sets ``needs_calibration`` and implements ``make_stat`` and ``prune_layer`` (or
``prune_unit`` to solve a basic unit jointly). Everything else (packages, hooks, weighting, timing,
memory, sparsity) is done here, the same way for every method, as the OBS-Diff paper compares them
("applied uniformly to all methods", App. B).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from edm.errors import ConfigError, NothingPatchedError
from edm.families import TARGET_GROUPS, adapter
from edm.methods.base import ApplyContext, MethodReport, WeightMethod
from edm.methods.weight.calibrate import (
    CalibSettings,
    Unit,
    check_setting_overrides,
    collect_stats,
    resolve_settings,
    split_packages,
)
from edm.methods.weight.hessian import WEIGHTINGS, HessianStat, timestep_weights
from edm.methods.weight.masks import check_pattern_sparsity, parse_pattern, zero_fraction

log = logging.getLogger(__name__)


def _peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """Peak memory since the last reset: CUDA allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "process_peak_rss"


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Copy a solved fp32 weight back in the layer's own dtype and device."""
    with torch.no_grad():
        module.weight.copy_(W.to(device=module.weight.device, dtype=module.weight.dtype))


class PruningMethod(WeightMethod):
    """Base of the layer-wise pruners. Constructor arguments are the shared config keys.

    Args:
        sparsity: fraction of weights removed in every targeted layer (usually ``${sparsity}``).
        pattern: ``unstructured``, ``2:4`` or ``4:8`` (N:M needs sparsity 0.5).
        targets: target groups resolved by the family adapter: ``attn``, ``ff`` and, for MMDiT,
            ``context`` (the text stream). Default: all, as OBS-Diff prunes all 12 linears/block.
        blocks: ``null`` (all transformer layers) or ``[start, stop)`` layer indices in forward
            order; the paper's 2:4 table prunes SD3.5-Large blocks 3..25 only.
        num_groups: module packages (paper default 4). 1 = one calibration pass for all layers
            (fastest, most memory); L = L passes, each after the earlier packages were pruned.
        weighting: timestep weighting of the calibration statistics (``log_decrease`` default).
        alpha_min, alpha_max: range of the timestep weights (0.8, 1.2).
        calibration: optional overrides of the calibration settings (``num_prompts``,
            ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``batch_size``,
            ``seed``); unset keys come from the calib config, then the run's ``gen``.
        keep_backup: keep CPU copies of the touched weights so that ``remove()`` can undo.
        name, tag: run naming (from the method config).
    """

    needs_calibration: ClassVar[bool] = True

    def __init__(
        self,
        sparsity: float,
        pattern: str = "unstructured",
        targets=TARGET_GROUPS,
        blocks=None,
        num_groups: int = 4,
        weighting: str = "log_decrease",
        alpha_min: float = 0.8,
        alpha_max: float = 1.2,
        calibration: dict | None = None,
        keep_backup: bool = False,
        name: str = "prune",
        tag: str | None = None,
    ):
        super().__init__(keep_backup=keep_backup)
        self.name, self.tag = name, tag or name
        self.sparsity = float(sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError("method.sparsity", f"must be in [0, 1), got {sparsity}.")
        self.pattern = str(pattern)
        self.nm = parse_pattern(self.pattern)
        check_pattern_sparsity(self.pattern, self.sparsity)
        self.targets = tuple(targets)
        bad = sorted(set(self.targets) - set(TARGET_GROUPS))
        if bad or not self.targets:
            raise ConfigError(
                "method.targets", f"unknown or empty target groups {bad}.", TARGET_GROUPS
            )
        self.blocks = self._check_blocks(blocks)
        if int(num_groups) < 1:
            raise ConfigError("method.num_groups", f"must be >= 1, got {num_groups}.")
        self.num_groups = int(num_groups)
        if weighting not in WEIGHTINGS:
            raise ConfigError("method.weighting", f"unknown weighting {weighting!r}.", WEIGHTINGS)
        self.weighting = weighting
        if not 0 < float(alpha_min) <= float(alpha_max):
            raise ConfigError(
                "method.alpha_min",
                f"need 0 < alpha_min <= alpha_max, got {alpha_min}, {alpha_max}.",
            )
        self.alpha_min, self.alpha_max = float(alpha_min), float(alpha_max)
        self.calibration = check_setting_overrides(
            dict(calibration) if calibration is not None else None
        )
        self._weights_cache: dict[int, torch.Tensor] = {}
        self._timing = {"calib_seconds": 0.0, "solve_seconds": 0.0}

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

    @property
    def needs_calib(self) -> bool:
        """Whether the runner must pre-flight the calibration set (``calib.check()``)."""
        return self.needs_calibration

    # ---- override points -------------------------------------------------------------------
    def target_units(self, pipe, denoiser: nn.Module) -> list[Unit]:
        """Ordered basic units of the layers to prune (default: the family adapter's units)."""
        return adapter(pipe).linear_units(denoiser, self.targets, self.blocks)

    def make_stat(self, name: str, module: nn.Module):
        """Calibration statistic of one layer (default: the timestep-weighted Hessian)."""
        return HessianStat(module.in_features, device=module.weight.device)

    def prune_unit(self, unit: Unit, stats: dict[str, Any]) -> None:
        """Prune one basic unit in place (default: each layer independently)."""
        for name, module in unit:
            self.prune_layer(name, module, stats.get(name))

    def prune_layer(self, name: str, module: nn.Module, stat) -> None:
        raise NotImplementedError

    # ---- shared machinery ------------------------------------------------------------------
    def step_weight(self, step: int, num_steps: int) -> float:
        """alpha of a 0-based step for a T-step trajectory (cached per T)."""
        if num_steps not in self._weights_cache:
            self._weights_cache[num_steps] = timestep_weights(
                self.weighting, num_steps, self.alpha_min, self.alpha_max
            )
        return float(self._weights_cache[num_steps][step])

    def calibration_plan(self, ctx: ApplyContext) -> tuple[list, CalibSettings]:
        """Calibration prompts (``ctx.calib.load()``) and resolved settings."""
        if ctx.calib is None:
            raise ConfigError(
                "calib",
                f"method {self.name!r} needs calibration prompts, but calib=none. Choose a "
                "calibration set (calib=digits for the embedded model, calib=gcc3m or "
                "calib=coco_train for real models).",
            )
        settings = resolve_settings(self.calibration, ctx.calib, ctx.gen)
        items = list(ctx.calib.load())
        if len(items) < settings.num_prompts:
            log.warning(
                "calibration set has %d prompts, fewer than num_prompts=%d; using all",
                len(items),
                settings.num_prompts,
            )
        return items[: settings.num_prompts], settings

    def hessian_collector(
        self, pipe, ctx: ApplyContext
    ) -> Callable[[Unit], dict[str, torch.Tensor]]:
        """``collect(named_linears) -> {name: H fp32}``: one weighted calibration pass per call.

        For methods that drive their own package loop (structured OBS); time spent is added to
        this method's ``calib_seconds``.
        """
        items, settings = self.calibration_plan(ctx)

        def collect(named_linears: Unit) -> dict[str, torch.Tensor]:
            cal = collect_stats(
                pipe, named_linears, self.make_stat, items, settings, self.step_weight
            )
            self._timing["calib_seconds"] += cal.seconds
            return {n: s.H for n, s in cal.stats.items()}

        return collect

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        denoiser = adapter(pipe).denoiser(pipe)
        units = self.target_units(pipe, denoiser)
        layers = [layer for unit in units for layer in unit]
        if not layers:
            raise NothingPatchedError(
                f"<method={self.name}> matched no linear layer (targets={list(self.targets)}, "
                f"blocks={self.blocks})"
            )
        self.backup(layers)
        device = next(denoiser.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        nonzero_before = sum(int((p != 0).sum()) for p in denoiser.parameters())

        items, settings = self.calibration_plan(ctx) if self.needs_calibration else ([], None)
        packages = split_packages(units, self.num_groups) if self.needs_calibration else [units]
        self._timing = {"calib_seconds": 0.0, "solve_seconds": 0.0}
        stats_peak, steps_seen = 0, set()
        for k, package in enumerate(packages):
            stats: dict[str, Any] = {}
            if self.needs_calibration:
                named = [layer for unit in package for layer in unit]
                cal = collect_stats(pipe, named, self.make_stat, items, settings, self.step_weight)
                self._timing["calib_seconds"] += cal.seconds
                steps_seen.update(cal.steps_seen)
                stats = cal.stats
                del cal
                stats_peak = max(stats_peak, sum(s.nbytes() for s in stats.values()))
            t0 = time.perf_counter()
            for unit in package:
                self.prune_unit(unit, stats)
            self._timing["solve_seconds"] += time.perf_counter() - t0
            log.info(
                "<method=%s> package %d/%d pruned (%d layers)",
                self.name,
                k + 1,
                len(packages),
                sum(len(u) for u in package),
            )
            del stats  # only one package's statistics are alive at a time

        return self.build_report(
            denoiser, layers, nonzero_before, device, settings, packages, stats_peak, steps_seen
        )

    def build_report(
        self, denoiser, layers, nonzero_before, device, settings, packages, stats_peak, steps_seen
    ) -> MethodReport:
        """Measure what was done: sparsity from the weights, parameters, time, memory."""
        per_layer = {name: zero_fraction(m.weight) for name, m in layers}
        zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
        numel = sum(m.weight.numel() for _, m in layers)
        peak_gb, peak_src = _peak_memory_gb(device)
        metrics = {
            "sparsity": zeros / numel,
            "params_total": float(sum(p.numel() for p in denoiser.parameters())),
            "params_nonzero_before": float(nonzero_before),
            "params_nonzero_after": float(sum(int((p != 0).sum()) for p in denoiser.parameters())),
            "target_params": float(numel),
            "calib_seconds": self._timing["calib_seconds"],
            "solve_seconds": self._timing["solve_seconds"],
            "prune_seconds": self._timing["calib_seconds"] + self._timing["solve_seconds"],
            "peak_mem_gb": peak_gb,
            "stats_peak_mb": stats_peak / 2**20,
            "num_packages": float(len(packages)),
        }
        details = {
            "per_layer_sparsity": per_layer,
            "pattern": self.pattern,
            "targets": list(self.targets),
            "weighting": self.weighting if self.needs_calibration else None,
            "calibration": settings.to_dict() if settings is not None else None,
            "steps_seen": sorted(steps_seen),
            "peak_mem_source": peak_src,
            "packages": [[n for unit in p for n, _ in unit] for p in packages],
        }
        return MethodReport(
            name=self.name,
            kind=self.kind,
            patched=len(layers),
            sparsity=metrics["sparsity"],
            metrics=metrics,
            details=details,
        )
