"""MagCache (Ma et al. 2025; diffusers ``MagCacheConfig``) as an edm method, with calibration.

MagCache skips the transformer blocks of a step (adding the last residual instead) while the
accumulated error predicted from the **magnitude ratios** stays below ``threshold``. The ratio of
step ``i`` is ``mean(||r_i|| / ||r_{i-1}||)`` over tokens, ``r`` being the residual (last block's
output minus first block's input); ratios depend on the checkpoint and the sampler, so they are
a knob, ``method.mag_ratios``:

* ``calibrate`` (default): before generation, run **one** trajectory of the run's own settings
  (steps, CFG, size; prompt ``method.calibration_prompt``, seed ``method.calibration_seed``)
  in diffusers' calibration mode (``MagCacheConfig(calibrate=True)``: nothing is skipped, the
  ratios are logged at the end), read the ratios from that log and use them. They are written to
  ``method_report.json`` (``details.mag_ratios``) so a later run can pass them as a list.
* a list of floats: given ratios (diffusers interpolates them to the run's step count);
* ``flux``: diffusers' ``FLUX_MAG_RATIOS`` (FLUX.1 at 28 steps, from the MagCache repo).

The same calibration by hand: ``python run.py model=... method=mag_cache
method.max_skip_steps=0`` and copy ``details.mag_ratios`` from ``method_report.json``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
from collections.abc import Sequence
from typing import ClassVar

import torch

from edm.errors import ConfigError
from edm.families import adapter
from edm.methods.base import ApplyContext
from edm.methods.cache.diffusers_cache import DiffusersCache, check_number
from edm.methods.cache.hooks import AppliedHooks

_LOGGER = "diffusers.hooks.mag_cache"
_RESULT = "MagCache Calibration Results:"


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.ratios: list[float] | None = None

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(_RESULT):
            self.ratios = [float(x) for x in ast.literal_eval(msg[len(_RESULT):].strip())]


@contextlib.contextmanager
def _captured_ratios():
    """Catch the ratios diffusers' calibration mode logs (and keep its ``print`` off stdout)."""
    log = logging.getLogger(_LOGGER)
    handler, level, propagate = _Capture(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


class MagCache(DiffusersCache):
    r"""MagCache on the transformer blocks of SD3/SD3.5 and FLUX.1.

    Args (defaults: diffusers' ``MagCacheConfig``):
        threshold (`float`, 0.06): in [0, 1]; the accumulated-error budget of a skip run.
        max_skip_steps (`int`, 3): K, most consecutive skipped steps (0 = never skip,
            bit-identical to dense).
        retention_ratio (`float`, 0.2): in [0, 1]; the first fraction of steps never skipped.
        mag_ratios (`"calibrate" | "flux" | list[float]`, defaults to ``"calibrate"``): see the
            module docstring.
        calibration_prompt (`str`), calibration_seed (`int`, 0): the calibration trajectory.
    """

    supported_families = ("sd3", "flux")
    why_unsupported: ClassVar[dict[str, str]] = {f: "needs top-level transformer blocks (UNets have none)"
                       for f in ("digits", "sd15", "sd21", "sdxl")}
    apply_fn = "apply_mag_cache"

    def __init__(self, threshold: float = 0.06, max_skip_steps: int = 3,
                 retention_ratio: float = 0.2, mag_ratios: str | Sequence[float] = "calibrate",
                 calibration_prompt: str = "a photo of an astronaut riding a horse on mars",
                 calibration_seed: int = 0, name: str = "mag_cache", tag: str | None = None):
        super().__init__()
        self.threshold = float(check_number("threshold", threshold, 0.0, 1.0))
        self.max_skip_steps = check_number("max_skip_steps", max_skip_steps, 0, integer=True)
        self.retention_ratio = float(check_number("retention_ratio", retention_ratio, 0.0, 1.0))
        if isinstance(mag_ratios, str):
            if mag_ratios not in ("calibrate", "flux"):
                raise ConfigError("method.mag_ratios", f"got {mag_ratios!r}; a list of floats or",
                                  ("calibrate", "flux"))
        else:
            ratios = list(mag_ratios)
            if not ratios:
                raise ConfigError("method.mag_ratios", "is an empty list.")
            mag_ratios = [float(check_number("mag_ratios", r, 0.0)) for r in ratios]
        self.mag_ratios = mag_ratios
        self.calibration_prompt = str(calibration_prompt)
        self.calibration_seed = check_number("calibration_seed", calibration_seed, 0, integer=True)
        self.name, self.tag = name, tag or f"magcache-{threshold:g}-k{max_skip_steps}"
        self.used_ratios: list[float] | None = None

    def _steps(self, ctx: ApplyContext) -> int:
        steps = ctx.gen.get("num_inference_steps")
        if not steps:
            raise ConfigError("gen.num_inference_steps", "MagCache needs the run's step count "
                                                         "(ApplyContext.gen) to place its ratios.")
        return int(steps)

    def calibrate(self, pipe, ctx: ApplyContext) -> list[float]:
        """One calibration trajectory with the run's settings; returns its magnitude ratios."""
        from diffusers.hooks import MagCacheConfig, apply_mag_cache
        from diffusers.models.cache_utils import CacheMixin

        denoiser = adapter(ctx.family).denoiser(pipe)
        mixin = isinstance(denoiser, CacheMixin)
        config = MagCacheConfig(calibrate=True, num_inference_steps=self._steps(ctx))
        added = AppliedHooks(denoiser, disable=denoiser.disable_cache if mixin else None)
        gen = ctx.gen
        call = dict(prompt=[self.calibration_prompt], num_inference_steps=self._steps(ctx),
                    generator=[torch.Generator("cpu").manual_seed(self.calibration_seed)],
                    output_type="latent", **(gen.get("call_kwargs") or {}))
        for key in ("guidance_scale", "height", "width"):
            if gen.get(key) is not None:
                call[key] = gen[key]
        try:
            with added:
                if mixin:
                    denoiser.enable_cache(config)
                else:
                    apply_mag_cache(denoiser, config)
            with _captured_ratios() as got, torch.no_grad():
                pipe(**call)
        finally:
            added.remove()
        if not got.ratios:
            raise RuntimeError("<method=mag_cache> diffusers' calibration logged no ratios "
                               "(did the denoiser run its transformer blocks?)")
        return got.ratios

    def build_config(self, pipe, ctx, timestep):
        from diffusers.hooks import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        if self.mag_ratios == "calibrate":
            ratios = self.calibrate(pipe, ctx)
        elif self.mag_ratios == "flux":
            ratios = FLUX_MAG_RATIOS.tolist()
        else:
            ratios = list(self.mag_ratios)
        self.used_ratios = ratios
        return MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip_steps,
                              retention_ratio=self.retention_ratio,
                              num_inference_steps=self._steps(ctx), mag_ratios=ratios)

    def install(self, pipe, patcher, ctx):
        report = super().install(pipe, patcher, ctx)
        report.details["mag_ratios"] = self.used_ratios
        report.details["mag_ratios_source"] = (self.mag_ratios if isinstance(self.mag_ratios, str)
                                               else "given")
        return report

    def metrics(self):
        return {"threshold": self.threshold, "max_skip_steps": float(self.max_skip_steps)}


__all__ = ["MagCache"]
