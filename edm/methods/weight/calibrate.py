"""Calibration: run the pipeline on calibration prompts and feed per-layer statistics.

``collect_stats`` is the only place that touches the pipeline for weight methods. It registers
temporary ``register_forward_hook``s on the requested linears (removed in ``finally``), tracks the
denoising step with :class:`edm.state.StepTracker` (no globals; positional UNet and keyword MMDiT
timesteps both work) and weights each call by ``alpha_t`` of its step. Every batch gets fresh,
seeded generators, so every module package (and every method) sees the same noise.

``split_packages`` implements OBS-Diff's module packages (spec §2.5): consecutive basic units in
``num_groups`` near-equal packages; each package is calibrated with all earlier ones pruned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from edm.errors import ConfigError
from edm.models.components import scheduler_class
from edm.state import StepTracker

log = logging.getLogger(__name__)

Unit = list[tuple[str, nn.Linear]]


class Stat(Protocol):
    def update(self, x: torch.Tensor, alpha: float = 1.0) -> None: ...
    def nbytes(self) -> int: ...


@dataclass
class CalibSettings:
    """How the calibration trajectories are generated (OBS-Diff paper defaults)."""

    num_prompts: int = 100
    num_inference_steps: int = 25
    guidance_scale: float = 7.0
    height: int = 512
    width: int = 512
    batch_size: int = 4
    seed: int = 24432
    # Model-card pipeline arguments of the run (``gen.call_kwargs``, e.g. FLUX.1-schnell's
    # ``max_sequence_length`` 256): calibration trajectories see the text length generation sees.
    call_kwargs: dict[str, Any] | None = None
    # Sampler of the calibration trajectories (a diffusers scheduler class name), swapped in for
    # the calibration pass only; None = the loaded pipeline's. OBS-Diff's robustness tables
    # (13) calibrate with one sampler and evaluate under others.
    scheduler: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SETTING_KEYS = tuple(f.name for f in fields(CalibSettings) if f.name != "call_kwargs")


def check_setting_overrides(overrides: dict | None, key: str = "method.calibration") -> dict:
    """Validate the method-level ``calibration:`` mapping (null values mean "not set")."""
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(SETTING_KEYS))
    if bad:
        raise ConfigError(key, f"unknown calibration settings {bad}.", SETTING_KEYS)
    for k, v in overrides.items():
        if k == "scheduler":
            if v is not None:
                scheduler_class(v, f"{key}.scheduler")
            continue
        if v is not None and k != "guidance_scale" and int(v) < (0 if k == "seed" else 1):
            raise ConfigError(f"{key}.{k}", f"must be a positive integer, got {v}.")
    return {k: v for k, v in overrides.items() if v is not None}


def resolve_settings(overrides: dict | None, calib: Any, gen: dict | None) -> CalibSettings:
    """Calibration settings, first non-null of: method config > calib config > run gen > paper.

    The embedded digits model has no calibration-specific settings in its calib config, so it
    calibrates at its own generation defaults (16x16, its CFG) taken from ``ctx.gen``; caption
    sets for real models carry the paper's 25 steps / CFG 7 / 512^2 / batch 4 / seed 24432.
    """
    overrides = check_setting_overrides(overrides)
    gen = dict(gen or {})
    values = {}
    for f in fields(CalibSettings):
        if f.name == "call_kwargs":  # the pipeline's, not a calibration choice
            continue
        run_value = None if f.name == "scheduler" else gen.get(f.name)
        for source in (overrides.get(f.name), getattr(calib, f.name, None), run_value):
            if source is not None:
                values[f.name] = source
                break
    values = {k: (v if k == "scheduler" else float(v) if k == "guidance_scale" else int(v))
              for k, v in values.items()}
    call_kwargs = gen.get("call_kwargs")
    if isinstance(call_kwargs, DictConfig):
        call_kwargs = OmegaConf.to_container(call_kwargs, resolve=True)
    call_kwargs = dict(call_kwargs or {}) or None
    return CalibSettings(**values, call_kwargs=call_kwargs)


def split_packages(units: Sequence[Unit], num_groups: int) -> list[list[Unit]]:
    """Split ordered basic units into ``num_groups`` consecutive, near-equal packages.

    The first ``len(units) % num_groups`` packages get one extra unit (``numpy.array_split``);
    empty packages (more groups than units) are dropped.
    """
    if num_groups < 1:
        raise ConfigError("method.num_groups", f"must be >= 1, got {num_groups}.")
    q, r = divmod(len(units), num_groups)
    out, start = [], 0
    for g in range(num_groups):
        size = q + (1 if g < r else 0)
        if size:
            out.append(list(units[start : start + size]))
        start += size
    return out


@dataclass
class Calibration:
    """Result of one calibration pass."""

    stats: dict[str, Any]
    steps_seen: list[int] = field(default_factory=list)
    denoiser_calls: int = 0
    seconds: float = 0.0


def _denoiser(pipe) -> nn.Module:
    from edm.families import adapter

    return adapter(pipe).denoiser(pipe)


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def collect_stats(
    pipe,
    layers: Sequence[tuple[str, nn.Module]],
    stat_factory: Callable[[str, nn.Module], Stat],
    calib_items: Sequence,
    settings: CalibSettings,
    step_weight: Callable[[int, int], float] | None = None,
) -> Calibration:
    """One calibration pass: all prompts x all steps, statistics for ``layers``.

    Args:
        pipe: a pipeline honouring the project's call contract (``edm_family`` set).
        layers: ``(name, module)`` pairs to observe; the statistic sees each call's input.
        stat_factory: ``(name, module) -> stat`` with ``update(x, alpha)`` and ``nbytes()``.
        calib_items: ``PromptItem``s (``index`` and ``prompt`` are used).
        settings: steps, CFG, resolution, batch size and base seed of the trajectories.
        step_weight: ``(step_index, num_steps) -> alpha``; None weighs every call 1.

    Returns:
        :class:`Calibration` with the stats by layer name, the step indices seen and timing.
    """
    if not calib_items:
        raise ConfigError("calib", "the calibration set is empty; set calib.num_prompts >= 1.")
    denoiser = _denoiser(pipe)
    device = next(denoiser.parameters()).device
    tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
    stats = {name: stat_factory(name, module) for name, module in layers}
    steps_seen: set[int] = set()
    handles = []
    t0 = time.perf_counter()

    def hook_for(name: str):
        def hook(module, args, output):
            state = tracker.state
            num_steps = state.num_steps or settings.num_inference_steps
            # Multi-call samplers (Heun) would index past T: they keep the last step's weight.
            step = min(max(state.step_index, 0), num_steps - 1)
            alpha = 1.0 if step_weight is None else float(step_weight(step, num_steps))
            steps_seen.add(state.step_index)
            stats[name].update(args[0].detach(), alpha)

        return hook

    # Calibration runs many short trajectories: silence the pipeline's progress bar meanwhile.
    bar_config = getattr(pipe, "_progress_bar_config", None)
    run_scheduler = getattr(pipe, "scheduler", None)
    if settings.scheduler is not None and run_scheduler is not None:
        # from_config keeps the model's betas / shift / prediction type; restored below
        pipe.scheduler = scheduler_class(settings.scheduler, "method.calibration.scheduler") \
            .from_config(run_scheduler.config)
        tracker.scheduler = pipe.scheduler
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        for name, module in layers:
            handles.append(module.register_forward_hook(hook_for(name)))
        for batch in _batches(list(calib_items), settings.batch_size):
            tracker.reset()
            generators = [
                torch.Generator(device=device).manual_seed(settings.seed + int(it.index))
                for it in batch
            ]
            pipe(
                prompt=[it.prompt for it in batch],
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=generators,
                output_type="pt",
                **(settings.call_kwargs or {}),
            )
    finally:
        if run_scheduler is not None:
            pipe.scheduler = run_scheduler
        for h in handles:
            h.remove()
        tracker.remove()
        if hasattr(pipe, "set_progress_bar_config"):
            if bar_config is None:
                del pipe._progress_bar_config
            else:
                pipe._progress_bar_config = bar_config
    return Calibration(
        stats=stats,
        steps_seen=sorted(steps_seen),
        denoiser_calls=tracker.state.calls,
        seconds=time.perf_counter() - t0,
    )
