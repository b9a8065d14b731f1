"""What every weight-pruning method shares: calibration, the module-package loop and the report.

:class:`PruningMethod` is the base of the package-driven pruners, layer-wise
(:class:`~edm.methods.weight.base_layerwise.LayerwisePruning`: magnitude, Wanda, SparseGPT,
OBS-Diff, DSnoT) and structured (:class:`~edm.methods.weight.base_structured.StructuredPruning`:
L1, structured OBS-Diff). It validates the shared arguments, resolves the calibration plan, and
runs :meth:`PruningMethod.prune_packages` -- the one package loop: calibrate a package of basic
units with every earlier package already pruned, prune its units, free its statistics. The same
loop for every method, as the OBS-Diff paper compares them ("applied uniformly to all methods",
App. B).

:func:`build_report` is the one ``MethodReport`` builder of all weight methods (Diff-Pruning,
which prunes through torch-pruning, included): zero patched is an error, peak memory and the
package run are recorded the same way for each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from edm.errors import ConfigError, NothingPatchedError
from edm.families import TARGET_GROUPS
from edm.methods.base import ApplyContext, Method, MethodReport, WeightMethod
from edm.methods.weight.calibrate import (
    Calibration,
    CalibSettings,
    Unit,
    check_setting_overrides,
    collect_stats,
    resolve_settings,
    split_packages,
)
from edm.methods.weight.hessian import WEIGHTINGS, HessianStat, timestep_weights
from edm.perf import peak_memory

log = logging.getLogger(__name__)


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Copy a solved fp32 weight back in the layer's own dtype and device."""
    with torch.no_grad():
        module.weight.copy_(W.to(device=module.weight.device, dtype=module.weight.dtype))


@dataclass
class PackageRun:
    """What :meth:`PruningMethod.prune_packages` did: packages, calibration, time, memory."""

    packages: list[list[Unit]]
    settings: CalibSettings | None = None  # None: the method needs no calibration
    weighting: str | None = None
    steps_seen: set[int] = field(default_factory=set)
    stats_peak_bytes: int = 0  # largest statistics of one package (what packages bound)
    calib_seconds: float = 0.0
    solve_seconds: float = 0.0


class PruningMethod(WeightMethod):
    """Base of the package-driven pruners. Constructor arguments are the shared config keys.

    Args:
        sparsity: fraction removed in every targeted layer / module (usually ``${sparsity}``).
        targets: target groups resolved by the family adapter: ``attn``, ``ff`` and, for MMDiT,
            ``context`` (the text stream). Default: all, as OBS-Diff prunes all 12 linears/block.
        num_groups: module packages (paper default 4). 1 = one calibration pass for all layers
            (fastest, most memory); L = L passes, each after the earlier packages were pruned.
        weighting: timestep weighting of the calibration statistics (``log_decrease`` default).
        alpha_min, alpha_max: range of the timestep weights (0.8, 1.2).
        calibration: optional overrides of the calibration settings (``num_prompts``,
            ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``batch_size``,
            ``seed``); unset keys come from the calib config, then the run's ``gen``.
        keep_backup: keep CPU copies of the touched weights so that ``remove()`` can undo.
        name, tag: run naming (from the method config).

    Methods that need no data set ``needs_calib = False`` (the runner then skips the calib
    pre-flight, and the package loop runs one package without statistics); the calibration
    arguments are accepted and unused.
    """

    needs_calib: ClassVar[bool] = True

    def __init__(
        self,
        sparsity: float,
        targets=TARGET_GROUPS,
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
        self.targets = tuple(targets)
        bad = sorted(set(self.targets) - set(TARGET_GROUPS))
        if bad or not self.targets:
            raise ConfigError(
                "method.targets", f"unknown or empty target groups {bad}.", TARGET_GROUPS
            )
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

    def check(self, family: str) -> None:
        super().check(family)
        sched = self.calibration.get("scheduler")
        if sched is not None:  # an epsilon sampler on a flow model runs and returns noise
            from edm.families import ARCH, SCHEDULERS

            allowed = SCHEDULERS.get(ARCH[family], ())
            if sched not in allowed:
                raise ConfigError("method.calibration.scheduler",
                                  f"family {family!r} cannot sample with {sched!r}.", allowed)

    # ---- override points -------------------------------------------------------------------
    def make_stat(self, name: str, module: nn.Module):
        """Calibration statistic of one layer (default: the timestep-weighted Hessian)."""
        return HessianStat(module.in_features, device=module.weight.device)

    def calibrate(self, pipe, layers: Unit, items: list, settings: CalibSettings) -> Calibration:
        """Statistics of ``layers`` (one package): one timestep-weighted calibration pass of the
        pipeline on ``items`` (default), each call weighted by :meth:`step_weight`."""
        return collect_stats(pipe, layers, self.make_stat, items, settings, self.step_weight)

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

    def prune_packages(
        self, pipe, ctx: ApplyContext, units: list[Unit],
        prune_unit: Callable[[Unit, dict[str, Any]], None],
    ) -> PackageRun:
        """The package loop: ``prune_unit(unit, stats)`` for every unit, in order.

        With calibration, ``units`` are split into ``num_groups`` packages and each package is
        calibrated on the pipeline as the earlier packages left it (``stats`` maps each of the
        package's layers to its statistic); without, all units form one package and ``stats`` is
        empty.
        """
        calibrated = self.needs_calib
        items, settings = self.calibration_plan(ctx) if calibrated else ([], None)
        run = PackageRun(
            packages=split_packages(units, self.num_groups) if calibrated else [units],
            settings=settings, weighting=self.weighting if calibrated else None,
        )
        for k, package in enumerate(run.packages):
            stats: dict[str, Any] = {}
            if calibrated:
                cal = self.calibrate(pipe, [layer for unit in package for layer in unit], items,
                                     settings)
                run.calib_seconds += cal.seconds
                run.steps_seen.update(cal.steps_seen)
                stats = cal.stats
                del cal
                run.stats_peak_bytes = max(
                    run.stats_peak_bytes, sum(s.nbytes() for s in stats.values())
                )
            t0 = time.perf_counter()
            for unit in package:
                prune_unit(unit, stats)
            run.solve_seconds += time.perf_counter() - t0
            log.info("<method=%s> package %d/%d pruned (%d layers)", self.name, k + 1,
                     len(run.packages), sum(len(u) for u in package))
            del stats  # only one package's statistics are alive at a time
        return run


def param_change(before: int, after: int) -> dict[str, float]:
    """``params_before``, ``params_after``, ``param_reduction`` of a method that changes shapes."""
    return {"params_before": float(before), "params_after": float(after),
            "param_reduction": 1.0 - after / before}


def build_report(
    method: Method,
    device: torch.device,
    *,
    patched: int,
    sparsity: float,
    metrics: dict[str, float],
    details: dict[str, Any],
    run: PackageRun | None = None,
) -> MethodReport:
    """The report of every weight method, measured after pruning.

    Args:
        device: the denoiser's device; peak memory (``peak_mem_gb``; ``details.peak_mem_source``
            says what was measured) is read from it.
        patched: layers (layer-wise) or modules (structured) the method changed; 0 is an error,
            never a silent no-op.
        sparsity: the measured sparsity (``metrics.sparsity`` and ``report.sparsity``).
        metrics, details: the method's own measurements.
        run: the package loop's record, when the method ran one: its timing
            (``calib_seconds``, ``solve_seconds``, ``prune_seconds``), ``stats_peak_mb``,
            ``num_packages`` and, in details, the weighting, calibration settings, steps seen and
            the layer names of every package.
    """
    if patched <= 0:
        raise NothingPatchedError(
            f"<method={method.name}> changed nothing at sparsity={sparsity:g} (a pruning that "
            "leaves the model as it was is reported as an error); raise the sparsity or check "
            "method.targets"
        )
    peak_gb, peak_src = peak_memory(device)
    out = {"sparsity": sparsity, **metrics}
    info = dict(details, peak_mem_source=peak_src)
    if run is not None:
        out.update({
            "calib_seconds": run.calib_seconds,
            "solve_seconds": run.solve_seconds,
            "prune_seconds": run.calib_seconds + run.solve_seconds,
            "stats_peak_mb": run.stats_peak_bytes / 2**20,
            "num_packages": float(len(run.packages)),
        })
        info.update({
            "weighting": run.weighting,
            "calibration": run.settings.to_dict() if run.settings is not None else None,
            "steps_seen": sorted(run.steps_seen),
            "packages": [[n for unit in p for n, _ in unit] for p in run.packages],
        })
    out["peak_mem_gb"] = peak_gb
    return MethodReport(name=method.name, kind=method.kind, patched=int(patched),
                        sparsity=float(sparsity), metrics=out, details=info)
