"""diffusers' cache hooks as edm methods: First-Block-Cache, TaylorSeer, PAB, FasterCache.

Each method builds one ``diffusers.hooks`` config from its knobs and applies it to the family's
denoiser, through ``enable_cache`` where the model is a ``CacheMixin`` (FLUX.1) and the matching
``apply_*`` function otherwise (SD3's and the UNets' classes are not ``CacheMixin`` in diffusers
0.42). What the pipeline would have to provide for the stateful hooks (a state reset per
trajectory, a cache context, the current timestep) comes from ``edm.methods.cache.hooks``.
MagCache, which needs calibration, is in ``mag_cache.py``.

Where each runs (diffusers 0.42.1, checked on the tiny pipelines by ``tests/test_cache.py``):

=================  ======================  ==================================================
cache              families                why not elsewhere
=================  ======================  ==================================================
first_block_cache  flux                    needs top-level ``transformer_blocks`` (UNets have
                                           none); on SD3 its tail hook subtracts the last
                                           block's text output, which SD3's
                                           ``context_pre_only`` last block returns as None
taylorseer_cache   all six                 UNets: ``cache_identifiers`` default to their
                                           attention modules (diffusers' default patterns
                                           only match top-level transformer blocks)
pab                all six                 matches attention modules by name, any denoiser
faster_cache       sd3, flux               its attention hooks only match top-level
                                           transformer blocks, and its CFG split chunks every
                                           positional tensor, which breaks on the UNet
                                           pipelines' 0-d timestep
mag_cache          sd3, flux               needs top-level transformer blocks
=================  ======================  ==================================================

Timestep ranges are in scheduler units (0..1000, noisiest first), as diffusers documents them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from edm.errors import ConfigError, UnsupportedFamily
from edm.families import FAMILIES, adapter
from edm.methods.base import ApplyContext, MethodReport, Patcher, RuntimeMethod
from edm.methods.cache.hooks import AppliedHooks, ContextHook, TrajectoryReset, scheduler_timestep
from edm.state import StepTracker

_CONTEXT_HOOK = "edm_cache_context"
_UNET_FAMILIES = ("digits", "sd15", "sd21", "sdxl")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_number(key: str, value, lo: float, hi: float | None = None, integer: bool = False):
    """``value`` as a number in ``[lo, hi]`` (``hi=None``: no upper bound), else ConfigError."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"method.{key}", f"must be {'an int' if integer else 'a number'}, "
                                           f"got {value!r}.")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise ConfigError(f"method.{key}", f"{value} is outside {bound}.")
    return value


def check_window(key: str, value) -> tuple[float, float]:
    """A ``[low, high]`` timestep window in scheduler units; the hooks test ``low < t < high``
    (strictly), so ``[-1, 1001]`` admits every timestep."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ConfigError(f"method.{key}", f"must be [low, high], got {value!r}.")
    lo, hi = (check_number(key, v, -1, 1001) for v in value)
    if not lo < hi:
        raise ConfigError(f"method.{key}", f"[{lo}, {hi}]: low must be < high.")
    return (lo, hi)


class DiffusersCache(RuntimeMethod):
    """One ``diffusers.hooks`` cache on the family's denoiser; removal restores it exactly.

    Subclasses set ``supported_families`` (plus ``why_unsupported`` reasons) and implement
    :meth:`build_config`; :meth:`apply_to` defaults to ``apply_fn``.
    """

    is_cache = True
    graph_breaks = (
        "runs diffusers' cache hooks, which decide per step in Python from the timestep and "
        "their own state (TaylorSeer's are torch.compiler.disable'd upstream): torch.compile "
        "runs them with graph breaks, so compile.fullgraph must be false")

    why_unsupported: ClassVar[dict[str, str]] = {}
    apply_fn: ClassVar[str] = ""  # name of the diffusers.hooks function for non-CacheMixin models

    def check(self, family: str) -> None:
        if family not in self.supported_families:
            why = self.why_unsupported.get(family, "")
            raise UnsupportedFamily(
                f"<method={self.name}> does not support model family {family!r}"
                f"{': ' + why if why else ''}; supported: {', '.join(self.supported_families)}")

    def build_config(self, pipe, ctx: ApplyContext, timestep) -> Any:
        raise NotImplementedError

    def apply_to(self, denoiser, config) -> None:
        import diffusers.hooks as H

        getattr(H, self.apply_fn)(denoiser, config)

    def metrics(self) -> dict[str, float]:
        """Knob values logged as ``method/<key>``."""
        return {}

    def install(self, pipe, patcher: Patcher, ctx: ApplyContext) -> MethodReport:
        from diffusers.models.cache_utils import CacheMixin

        denoiser = adapter(ctx.family).denoiser(pipe)
        mixin = isinstance(denoiser, CacheMixin)
        if mixin and denoiser.is_cache_enabled:
            raise RuntimeError(f"<method={self.name}> the denoiser already has a cache "
                               f"({type(denoiser._cache_config).__name__}); remove it first")
        tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
        patcher.add_handle(tracker)
        if not mixin:
            # FLUX.1's pipeline opens the context and resets the state itself (a reset here
            # would also clear the context it just opened); SD3's and the UNets' do neither.
            patcher.add_handle(TrajectoryReset(denoiser, tracker))
            patcher.register_hook(denoiser, ContextHook(), _CONTEXT_HOOK)
        config = self.build_config(pipe, ctx, scheduler_timestep(pipe, tracker))
        added = AppliedHooks(denoiser, disable=denoiser.disable_cache if mixin else None)
        with added:
            if mixin:
                denoiser.enable_cache(config)
            else:
                self.apply_to(denoiser, config)
        patcher.add_handle(added)
        return MethodReport(
            name=self.name, kind=self.kind, patched=added.modules, metrics=self.metrics(),
            details={"config": repr(config), "hooks": sorted({n for _, n in added.hooks}),
                     "via": "enable_cache" if mixin else self.apply_fn})


class FirstBlockCache(DiffusersCache):
    r"""First-Block-Cache (ParaAttention; diffusers ``FirstBlockCacheConfig``).

    Every step runs the first transformer block; if its output residual changed by less than
    ``threshold`` (mean absolute difference relative to the previous step's) the remaining
    blocks are skipped and their last residual is added instead.

    Args:
        threshold (`float`, defaults to 0.05, diffusers' default): in [0, 1]; 0 never skips
            (bit-identical to dense), higher skips more.
    """

    supported_families = ("flux",)
    why_unsupported: ClassVar[dict[str, str]] = {
        **{f: "UNets have no top-level transformer_blocks for its head/tail hooks"
           for f in _UNET_FAMILIES},
        "sd3": "its tail hook subtracts the last block's text-stream output, which SD3's "
               "context_pre_only last block returns as None (TypeError in diffusers 0.42.1)",
    }
    apply_fn = "apply_first_block_cache"

    def __init__(self, threshold: float = 0.05, name: str = "first_block_cache",
                 tag: str | None = None):
        super().__init__()
        self.threshold = float(check_number("threshold", threshold, 0.0, 1.0))
        self.name, self.tag = name, tag or f"fbc-{threshold:g}"

    def build_config(self, pipe, ctx, timestep):
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)

    def metrics(self):
        return {"threshold": self.threshold}


# UNet attention modules (self and cross) inside their transformer layers; diffusers' default
# patterns start at a top-level ``transformer_blocks`` that UNets do not have.
UNET_ATTENTION_PATTERNS = (r".*transformer_blocks\.\d+\.attn[12]",)


class TaylorSeerCache(DiffusersCache):
    r"""TaylorSeer (Liu et al. 2025; diffusers ``TaylorSeerCacheConfig``): on cached steps the
    hooked modules' outputs are forecast by a Taylor expansion over the last full steps.

    Args (defaults: diffusers' ``TaylorSeerCacheConfig``):
        cache_interval (`int`, 5): one full step every N after the warm-up (1 = always full,
            bit-identical to dense).
        disable_cache_before_step (`int`, 3): full steps at the start, >= 1 (the expansion needs
            one full step before the first forecast).
        disable_cache_after_step (`int | None`, None): full steps from this step on.
        max_order (`int`, 1): order of the expansion, 0..4.
        taylor_factors_dtype (`str`, "bfloat16"): float32 | bfloat16 | float16.
        cache_identifiers (`list[str] | None`): regexes (``re.fullmatch``) of forecast modules;
            None = diffusers' attention patterns on transformers, the UNet's attention modules
            (``UNET_ATTENTION_PATTERNS``) on UNets.
        skip_predict_identifiers (`list[str] | None`), use_lite_mode (`bool`, False): diffusers'.
    """

    supported_families = FAMILIES
    apply_fn = "apply_taylorseer_cache"

    def __init__(self, cache_interval: int = 5, disable_cache_before_step: int = 3,
                 disable_cache_after_step: int | None = None, max_order: int = 1,
                 taylor_factors_dtype: str = "bfloat16", cache_identifiers: list | None = None,
                 skip_predict_identifiers: list | None = None, use_lite_mode: bool = False,
                 name: str = "taylorseer_cache", tag: str | None = None):
        super().__init__()
        self.cache_interval = check_number("cache_interval", cache_interval, 1, integer=True)
        self.disable_cache_before_step = check_number(
            "disable_cache_before_step", disable_cache_before_step, 1, integer=True)
        if disable_cache_after_step is not None:
            check_number("disable_cache_after_step", disable_cache_after_step, 0, integer=True)
        self.disable_cache_after_step = disable_cache_after_step
        self.max_order = check_number("max_order", max_order, 0, 4, integer=True)
        if taylor_factors_dtype not in _DTYPES:
            raise ConfigError("method.taylor_factors_dtype", f"got {taylor_factors_dtype!r}.",
                              _DTYPES)
        self.taylor_factors_dtype = taylor_factors_dtype
        self.cache_identifiers = list(cache_identifiers) if cache_identifiers else None
        self.skip_predict_identifiers = (list(skip_predict_identifiers)
                                         if skip_predict_identifiers else None)
        self.use_lite_mode = bool(use_lite_mode)
        self.name, self.tag = name, tag or f"taylorseer-n{cache_interval}-o{max_order}"

    def build_config(self, pipe, ctx, timestep):
        from diffusers.hooks import TaylorSeerCacheConfig

        ids = self.cache_identifiers
        if ids is None and adapter(ctx.family).arch == "unet" and not self.use_lite_mode:
            ids = list(UNET_ATTENTION_PATTERNS)
        return TaylorSeerCacheConfig(
            cache_interval=self.cache_interval,
            disable_cache_before_step=self.disable_cache_before_step,
            disable_cache_after_step=self.disable_cache_after_step, max_order=self.max_order,
            taylor_factors_dtype=_DTYPES[self.taylor_factors_dtype], cache_identifiers=ids,
            skip_predict_identifiers=self.skip_predict_identifiers,
            use_lite_mode=self.use_lite_mode)

    def metrics(self):
        return {"cache_interval": float(self.cache_interval), "max_order": float(self.max_order)}


class PyramidAttentionBroadcast(DiffusersCache):
    r"""Pyramid Attention Broadcast (Zhao et al. 2024; diffusers
    ``PyramidAttentionBroadcastConfig``): inside a timestep window, attention outputs are
    recomputed every N calls and broadcast (reused) in between.

    Args:
        spatial_attention_block_skip_range (`int | None`, defaults to 2, diffusers' fallback
            and its documented example): self-attention recomputed every N calls (1 = always,
            bit-identical to dense); SD3/FLUX joint attention counts as spatial.
        cross_attention_block_skip_range (`int | None`, defaults to None = off): UNet
            cross-attention (attn2); the paper broadcasts it the longest (its Open-Sora
            setting uses 6).
        spatial_attention_timestep_skip_range, cross_attention_timestep_skip_range
            (`[low, high]`, defaults to [100, 800], diffusers'): the window of scheduler
            timesteps in which reuse is allowed.
    """

    supported_families = FAMILIES
    apply_fn = "apply_pyramid_attention_broadcast"

    def __init__(self, spatial_attention_block_skip_range: int | None = 2,
                 cross_attention_block_skip_range: int | None = None,
                 spatial_attention_timestep_skip_range: Sequence[float] = (100, 800),
                 cross_attention_timestep_skip_range: Sequence[float] = (100, 800),
                 name: str = "pab", tag: str | None = None):
        super().__init__()
        for key, v in (("spatial_attention_block_skip_range", spatial_attention_block_skip_range),
                       ("cross_attention_block_skip_range", cross_attention_block_skip_range)):
            if v is not None:
                check_number(key, v, 1, integer=True)
        if spatial_attention_block_skip_range is None and cross_attention_block_skip_range is None:
            raise ConfigError("method.spatial_attention_block_skip_range",
                              "and cross_attention_block_skip_range are both null: nothing to do.")
        self.spatial = spatial_attention_block_skip_range
        self.cross = cross_attention_block_skip_range
        self.spatial_window = check_window("spatial_attention_timestep_skip_range",
                                           spatial_attention_timestep_skip_range)
        self.cross_window = check_window("cross_attention_timestep_skip_range",
                                         cross_attention_timestep_skip_range)
        self.name, self.tag = name, tag or f"pab-s{self.spatial}-c{self.cross}"

    def build_config(self, pipe, ctx, timestep):
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial,
            cross_attention_block_skip_range=self.cross,
            spatial_attention_timestep_skip_range=self.spatial_window,
            cross_attention_timestep_skip_range=self.cross_window,
            current_timestep_callback=timestep)

    def metrics(self):
        return {k: float(v) for k, v in (("spatial_skip_range", self.spatial),
                                         ("cross_skip_range", self.cross)) if v is not None}


# Inputs of the SD3 call that are CFG-batched keywords: diffusers' list plus SD3's pooled text.
_SD3_CFG_KWARGS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                   "encoder_attention_mask", "pooled_projections")


class FasterCache(DiffusersCache):
    r"""FasterCache (Lv et al. 2024; diffusers ``FasterCacheConfig``): attention outputs are
    extrapolated from the last two computed ones, and the unconditional CFG half is skipped on
    most steps and rebuilt from the conditional one by frequency-band deltas (CFG-Cache).

    Args (defaults: diffusers' ``FasterCacheConfig``; windows in scheduler timesteps):
        spatial_attention_block_skip_range (`int`, 2): attention recomputed every N calls.
        spatial_attention_timestep_skip_range (`[low, high]`, [-1, 681]).
        unconditional_batch_skip_range (`int`, 5): the unconditional half recomputed every N
            steps (1 = always; with CFG the attention is then never skipped either, so 1 is
            bit-identical to dense on CFG families).
        unconditional_batch_timestep_skip_range (`[low, high]`, [-1, 641]).
        low_frequency_weight_update_timestep_range (`[low, high]`, [99, 901]),
        high_frequency_weight_update_timestep_range (`[low, high]`, [-1, 301]),
        alpha_low_frequency, alpha_high_frequency (`float`, 1.1): the paper's Eq. 11 weights.
        attention_weight (`float`, 0.5): weight of the attention extrapolation (diffusers'
            default when no schedule callback is given).

    FLUX.1 (guidance-distilled) and runs with ``guidance_scale <= 1`` have no CFG batch: only
    the attention reuse applies there (``is_guidance_distilled`` is set from the run).
    """

    supported_families = ("sd3", "flux")
    why_unsupported: ClassVar[dict[str, str]] = {f: "its attention hooks only match top-level transformer blocks and its "
                          "CFG split chunks the UNet pipelines' 0-d positional timestep"
                       for f in _UNET_FAMILIES}
    apply_fn = "apply_faster_cache"

    def __init__(self, spatial_attention_block_skip_range: int = 2,
                 spatial_attention_timestep_skip_range: Sequence[float] = (-1, 681),
                 unconditional_batch_skip_range: int = 5,
                 unconditional_batch_timestep_skip_range: Sequence[float] = (-1, 641),
                 low_frequency_weight_update_timestep_range: Sequence[float] = (99, 901),
                 high_frequency_weight_update_timestep_range: Sequence[float] = (-1, 301),
                 alpha_low_frequency: float = 1.1, alpha_high_frequency: float = 1.1,
                 attention_weight: float = 0.5, name: str = "faster_cache",
                 tag: str | None = None):
        super().__init__()
        self.spatial = check_number("spatial_attention_block_skip_range",
                                    spatial_attention_block_skip_range, 1, integer=True)
        self.uncond = check_number("unconditional_batch_skip_range",
                                   unconditional_batch_skip_range, 1, integer=True)
        self.windows = {k: check_window(k, v) for k, v in (
            ("spatial_attention_timestep_skip_range", spatial_attention_timestep_skip_range),
            ("unconditional_batch_timestep_skip_range", unconditional_batch_timestep_skip_range),
            ("low_frequency_weight_update_timestep_range",
             low_frequency_weight_update_timestep_range),
            ("high_frequency_weight_update_timestep_range",
             high_frequency_weight_update_timestep_range))}
        self.alpha_low = float(check_number("alpha_low_frequency", alpha_low_frequency, 0, 10))
        self.alpha_high = float(check_number("alpha_high_frequency", alpha_high_frequency, 0, 10))
        self.attention_weight = float(check_number("attention_weight", attention_weight, 0, 1))
        self.name, self.tag = name, tag or f"fastercache-s{self.spatial}-u{self.uncond}"

    def build_config(self, pipe, ctx, timestep):
        from diffusers.hooks import FasterCacheConfig

        scale = ctx.gen.get("guidance_scale")
        distilled = ctx.family == "flux" or (scale is not None and float(scale) <= 1.0)
        weight = self.attention_weight
        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.spatial,
            unconditional_batch_skip_range=self.uncond,
            alpha_low_frequency=self.alpha_low, alpha_high_frequency=self.alpha_high,
            attention_weight_callback=lambda _module: weight, current_timestep_callback=timestep,
            tensor_format="BCHW", is_guidance_distilled=distilled,
            _unconditional_conditional_input_kwargs_identifiers=list(_SD3_CFG_KWARGS),
            **self.windows)

    def metrics(self):
        return {"spatial_skip_range": float(self.spatial),
                "uncond_skip_range": float(self.uncond)}


__all__ = ["DiffusersCache", "FasterCache", "FirstBlockCache", "PyramidAttentionBroadcast",
           "TaylorSeerCache", "check_number", "check_window"]
