"""ToMe for Stable Diffusion, wired through public diffusers seams.

Placement (tomesd's, spec §3.1): per transformer layer, one matching is computed from the layer's
input ``x`` (pre-norm); self-attention runs on the merged tokens and its output is unmerged
before the residual; cross-attention and the MLP may be merged the same way (off by default)::

    x = u(attn1(m(norm1(x)))) + x ;  x = u(attn2(m(norm2(x)), ctx)) + x ;  x = u(ff(m(norm3(x)))) + x

Seams, no copied ``forward``:

* a ``diffusers.hooks.ModelHook`` on each selected ``BasicTransformerBlock`` (UNet) or
  ``JointTransformerBlock`` (MMDiT) computes the matching in ``pre_forward`` and clears it after;
* a ``ModelHook`` on each merged submodule (``attn1``/``attn2``/``ff``; MMDiT ``attn``/``attn2``/
  ``ff``) merges its ``hidden_states`` argument and unmerges its output. The attention processor
  is untouched, so fused SDPA keeps running on the shorter sequence;
* :class:`edm.state.StepTracker` gives the latent size (bound by signature, so a keyword call
  ``unet(sample=...)`` works, unlike tomesd, which reads the first positional argument) and the
  step index for DSAP.

MMDiT (SD3/SD3.5, beyond tomesd): the image tokens of each joint block are merged for the joint
attention (text tokens untouched; queries, keys and values of the image stream are merged),
for SD3.5's extra image-only attention (``attn2``) with ``merge_attn``, and for the image MLP with
``merge_mlp``; ``merge_crossattn`` has nothing to act on there. The grid is the patch grid, so
every joint block has downsample 1.

FLUX.1 (beyond tomesd): the image tokens of every double- and single-stream block are merged for
its attention (and, with ``merge_mlp``, its image MLP); text tokens are never merged, merged
tokens take their destination's rotary position, and the grid comes from ``img_ids``
(:mod:`edm.methods.token.flux`). Per-sample rotary rows need a processor of our own there
(:mod:`edm.methods.token.flux_attn`; still fused SDPA). FLUX has no CFG batch, so random
destinations stay on for odd batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from diffusers.hooks import ModelHook
from torch import nn

from edm.errors import ConfigError, NothingPatchedError, UnsupportedFamily
from edm.families import ARCH, METHOD_FAMILIES, AttentionBlock, adapter
from edm.methods.base import ApplyContext, MethodReport, Patcher, RatioMeter, RuntimeMethod
from edm.methods.token.dsap import DSAP
from edm.methods.token.flux import FluxGrid, check_tome_flux, install_tome_flux_layer
from edm.methods.token.hook_args import TrajectoryRNG, hidden_arg, with_hidden
from edm.methods.token.tome_kernel import bipartite_merge, draw_destinations, identity
from edm.state import StepTracker

log = logging.getLogger(__name__)

_EDM_TOME_HOOK = "edm_tome"
_MAX_DOWNSAMPLE = (1, 2, 4, 8)


@dataclass
class _Match:
    """The closures of one layer's current forward (identity outside it)."""

    merge: object = identity
    unmerge: object = identity
    shape: tuple[int, int] | None = None  # (B, N) the closures were built for
    order: object = None  # [B, N - r] raster index each merged slot stands for (None: no merge)


@dataclass(frozen=True)
class _Settings:
    """What the hooks need of a :class:`ToMe` (built once per ``apply``)."""

    ratio: float
    dsap: DSAP
    sx: int
    sy: int
    use_rand: bool
    cfg_batches: bool = True  # the family batches CFG halves (not FLUX: guidance-distilled)


@dataclass
class _Run:
    """State shared by every hook of one ``apply``."""

    cfg: _Settings
    tracker: StepTracker
    rng: TrajectoryRNG
    meter: RatioMeter = field(default_factory=RatioMeter)
    grid: FluxGrid | None = None  # FLUX: the token grid comes from img_ids
    layers: list[_LayerHook] = field(default_factory=list)  # in forward order


class _Planner:
    """Forward pre-hook on the denoiser: every layer's ratio (DSAP) and random destinations for
    this call, decided before the denoiser's ``forward`` runs.

    ``compile.enabled`` compiles only that ``forward`` (:func:`edm.runner.compile_denoiser`),
    so this runs eagerly: it reads the step index and draws from the generator, neither of
    which a traced graph can do without a break or a recompile per step. The draws are made in
    the layers' forward order, each exactly as the layer would have made it (one
    ``draw_destinations`` per layer that merges), so the random stream -- and tomesd parity --
    is unchanged.
    """

    def __init__(self, run: _Run):
        self.run = run

    def __call__(self, module, args, kwargs):
        run, c = self.run, self.run.cfg
        state = run.tracker.state
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if x is not None:
            run.meter.prepare(x.device)
        for layer in run.layers:
            layer.ratio = c.dsap.ratio(c.ratio, layer.block, state.step_index, state.num_steps)
            layer.pick = None
            hw = layer.planned_grid()
            if hw is None or x is None:  # FLUX on meta: grid unknown, the layer draws itself
                continue
            r = int(hw[0] * hw[1] * layer.ratio)
            if r > 0 and layer.uses_rand(int(x.shape[0])):
                layer.pick = (hw, draw_destinations(*hw, c.sx, c.sy,
                                                    run.rng.generator_for(x.device), x.device))


class _LayerHook(ModelHook):
    """Computes one layer's matching from its input (pre-norm ``x``), tomesd's metric."""

    def __init__(self, run: _Run, block: AttentionBlock, div: int | None, match: _Match):
        super().__init__()
        self.run, self.block, self.div, self.match = run, block, div, match
        self.ratio = 0.0  # this call's, set by _Planner
        self.pick = None  # ((h, w), destinations) drawn by _Planner for this call, or None
        run.layers.append(self)

    def uses_rand(self, batch: int) -> bool:
        # tomesd: with an odd batch the CFG halves are not batched together and random
        # destinations cause artifacts, so use the top-left destination.
        c = self.run.cfg
        return c.use_rand and (batch % 2 == 0 or not c.cfg_batches)

    def planned_grid(self) -> tuple[int, int] | None:
        """This call's token grid as known before the denoiser runs (None: FLUX on meta)."""
        if self.div is None:
            return self.run.grid.hw
        hw = self.run.tracker.state.latent_hw
        return None if hw is None else (math.ceil(hw[0] / self.div), math.ceil(hw[1] / self.div))

    def pre_forward(self, module, *args, **kwargs):
        x = hidden_arg(args, kwargs)
        B, N = x.shape[0], x.shape[1]
        h, w = self._grid(N)
        c = self.run.cfg
        r = int(N * self.ratio)
        self.run.meter.add(r, N, x.device)
        use_rand = self.uses_rand(B)
        pick = self.pick[1] if self.pick is not None and self.pick[0] == (h, w) else None
        gen = self.run.rng.generator_for(x.device) if (use_rand and r > 0 and pick is None) \
            else None
        m, u, order = bipartite_merge(x, w, h, r, c.sx, c.sy, use_rand, gen, return_order=True,
                                      pick=pick)
        self.match.merge, self.match.unmerge, self.match.shape = m, u, (B, N)
        self.match.order = order
        return args, kwargs

    def _grid(self, n: int) -> tuple[int, int]:
        if self.div is None:  # FLUX: packed tokens, grid from img_ids
            return self.run.grid.grid(n, self.block.name)
        state = self.run.tracker.state
        if state.latent_hw is None:
            raise RuntimeError(
                "<method=tome> layer called outside a denoiser call (no latent size)"
            )
        H, W = state.latent_hw
        h, w = math.ceil(H / self.div), math.ceil(W / self.div)
        if h * w != n:
            raise RuntimeError(
                f"<method=tome> {self.block.name}: {n} tokens do not form the {h}x{w} grid "
                f"expected from latent {H}x{W} / {self.div}"
            )
        return h, w

    def post_forward(self, module, output):
        self.match.merge, self.match.unmerge, self.match.shape = identity, identity, None
        self.match.order = None
        return output


class _MergeHook(ModelHook):
    """Merges a submodule's ``hidden_states`` and unmerges its (first) output."""

    def __init__(self, match: _Match, where: str):
        super().__init__()
        self.match, self.where = match, where

    def pre_forward(self, module, *args, **kwargs):
        if self.match.shape is None:
            return args, kwargs
        x = hidden_arg(args, kwargs)
        if tuple(x.shape[:2]) != self.match.shape:
            # e.g. diffusers' feed-forward chunking calls ``ff`` on slices of the sequence.
            raise RuntimeError(
                f"<method=tome> {self.where} got {tuple(x.shape[:2])} tokens, the matching is for "
                f"{self.match.shape}; disable feed-forward chunking or merge_mlp"
            )
        if self.where.endswith("attn1") and kwargs.get("attention_mask") is not None:
            raise RuntimeError(
                f"<method=tome> {self.where}: a self-attention mask cannot be merged"
            )
        return with_hidden(args, kwargs, self.match.merge(x))

    def post_forward(self, module, output):
        if self.match.shape is None:
            return output
        if isinstance(output, tuple):  # MMDiT joint attention: (image, context)
            return (self.match.unmerge(output[0]), *output[1:])
        return self.match.unmerge(output)


class ToMe(RuntimeMethod):
    r"""Token Merging for Stable Diffusion (Bolya & Hoffman 2023), tomesd's placement and defaults.

    Important args:
        ratio (`float`, defaults to 0.5): fraction of *all* tokens of a merged layer removed by
            merging (``r = int(N * ratio)``). At most ``1 - 1/(sx*sy)`` (0.75 for 2x2); tomesd's
            author recommends <= 0.5.
        max_downsample (`int`, defaults to 1): merge only layers whose token grid is at most this
            many times smaller than the latent (1, 2, 4 or 8). 1 = highest-resolution attention
            only, which SDXL does not have: there it patches nothing and ``apply`` raises
            ``NothingPatchedError`` (tomesd silently does nothing). Use 2 or 4 for SDXL.
            MMDiT blocks all count as 1.

    Args to tinker with:
        sx, sy (`int`, defaults to 2): destination cell size; larger cells allow higher ratios.
        use_rand (`bool`, defaults to True): random destination per cell (off for odd batches,
            as in tomesd). Turn off if artifacts appear.
        merge_attn (`bool`, defaults to True): merge for self-attention (recommended).
        merge_crossattn (`bool`, defaults to False): merge the queries of cross-attention (UNet
            only; MMDiT has none to act on; on FLUX ``true`` is a ``ConfigError``).
        merge_mlp (`bool`, defaults to False): merge for the feed-forward layer. Needed to reach
            large FLOPs savings (the AT-EDM budget configs use all three). FLUX: the double
            blocks' ``ff`` and the single blocks' ``proj_mlp`` (their ``proj_out`` stays full).
        seed (`int | None`, defaults to None): seed of the random destinations, re-seeded at
            every trajectory start (reproducible per image). ``None`` = tomesd's behaviour: a fork
            of the global RNG taken at first use and drawn from ever after.
        dsap (`dict | None`): denoising-steps-aware schedule (AT-EDM §DSAP, shared
            :class:`edm.methods.token.dsap.DSAP`): during the first ``early_steps`` steps the
            exempt blocks (``block_rule``) are not merged and the others use
            ``early_prune_ratio`` as their merge ratio. ``None``/disabled = constant ratio.
        name, tag: run bookkeeping.
    """

    supported_families = (*METHOD_FAMILIES, "flux")

    def __init__(
        self,
        ratio: float = 0.5,
        max_downsample: int = 1,
        sx: int = 2,
        sy: int = 2,
        use_rand: bool = True,
        merge_attn: bool = True,
        merge_crossattn: bool = False,
        merge_mlp: bool = False,
        seed: int | None = None,
        dsap: dict | DSAP | None = None,
        name: str = "tome",
        tag: str | None = None,
    ):
        super().__init__()
        if not (
            isinstance(sx, int) and isinstance(sy, int) and sx >= 1 and sy >= 1 and sx * sy > 1
        ):
            raise ConfigError("method.sx", f"sx={sx}, sy={sy}: positive ints with sx*sy > 1.")
        max_ratio = 1 - 1 / (sx * sy)
        if not 0 <= ratio <= max_ratio:
            raise ConfigError(
                "method.ratio", f"{ratio} is outside [0, {max_ratio:g}] for {sx}x{sy} cells."
            )
        if max_downsample not in _MAX_DOWNSAMPLE:
            raise ConfigError("method.max_downsample", f"got {max_downsample}.", _MAX_DOWNSAMPLE)
        if not (merge_attn or merge_crossattn or merge_mlp):
            raise ConfigError(
                "method.merge_attn", "merge_attn, merge_crossattn and merge_mlp are all off."
            )
        self.ratio, self.max_downsample, self.sx, self.sy = float(ratio), max_downsample, sx, sy
        self.use_rand, self.seed = use_rand, seed
        self.merge_attn = merge_attn
        self.merge_crossattn = merge_crossattn
        self.merge_mlp = merge_mlp
        self.dsap = DSAP.from_cfg(dsap)  # None = off
        early = self.dsap.early_prune_ratio
        if self.dsap.enabled and early is not None and not 0 <= early <= max_ratio:
            raise ConfigError("method.dsap.early_prune_ratio", f"outside [0, {max_ratio:g}].")
        self.name = name
        self.tag = tag or f"tome-r{ratio:g}"
        self._run: _Run | None = None

    def check(self, family: str) -> None:
        super().check(family)
        if ARCH[family] == "flux":
            check_tome_flux(self.merge_crossattn)

    def _targets(self, layer: nn.Module, arch: str) -> list[tuple[str, nn.Module]]:
        """The submodules of one transformer layer that run on merged tokens."""
        picks = [
            ("attn1" if arch == "unet" else "attn", self.merge_attn),
            ("attn2", self.merge_attn if arch == "mmdit" else self.merge_crossattn),
            ("ff", self.merge_mlp),
        ]
        return [
            (n, getattr(layer, n)) for n, on in picks if on and getattr(layer, n, None) is not None
        ]

    def install(self, pipe, patcher: Patcher, ctx: ApplyContext) -> MethodReport:
        ad = adapter(ctx.family)
        denoiser = getattr(pipe, ad.denoiser_attr, None)
        if denoiser is None:  # e.g. a UNet pipeline applied as family flux
            raise UnsupportedFamily(
                f"<method=tome> a {ctx.family} pipeline has a `{ad.denoiser_attr}`; "
                f"{type(pipe).__name__} has none"
            )
        for _, mod in denoiser.named_modules():
            registry = getattr(mod, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_EDM_TOME_HOOK) is not None:
                raise RuntimeError(
                    "<method=tome> already applied by another ToMe; remove() it first"
                )
        tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
        patcher.add_handle(tracker)  # undo() calls tracker.remove()
        flux = ad.arch == "flux"
        settings = _Settings(self.ratio, self.dsap, self.sx, self.sy, self.use_rand,
                             cfg_batches=not flux)
        run = _Run(settings, tracker, TrajectoryRNG(tracker, self.seed))
        if flux:
            run.grid = FluxGrid(denoiser)
            patcher.add_handle(run.grid)
        # after the tracker and the grid (hooks run in registration order): it reads both
        patcher.add_handle(denoiser.register_forward_pre_hook(_Planner(run), with_kwargs=True))
        # tokens per latent pixel side: the UNet block's downsample, the MMDiT's patch size
        patch = getattr(getattr(denoiser, "config", None), "patch_size", 1) or 1
        layers, skipped = [], []
        for block in ad.attention_blocks(denoiser):
            ds = block.downsample
            if ds > self.max_downsample:
                skipped.append(block.name)
                log.info(
                    "<method=tome> skip %s: downsample %d > max_downsample %d",
                    block.name,
                    ds,
                    self.max_downsample,
                )
                continue
            for layer_name, layer in block.layers:
                match = _Match()
                if flux:
                    merged = install_tome_flux_layer(patcher, layer, layer_name, match,
                                                     self.merge_attn, self.merge_mlp,
                                                     _EDM_TOME_HOOK)
                else:
                    targets = self._targets(layer, ad.arch)
                    for sub_name, sub in targets:
                        where = f"{layer_name}.{sub_name}"
                        patcher.register_hook(sub, _MergeHook(match, where), _EDM_TOME_HOOK)
                    merged = [n for n, _ in targets]
                if not merged:
                    continue
                div = None if flux else (ds if ad.arch == "unet" else patch)
                patcher.register_hook(layer, _LayerHook(run, block, div, match), _EDM_TOME_HOOK)
                layers.append({"name": layer_name, "downsample": ds, "merged": merged})
        if not layers and skipped:
            # The SDXL pitfall (spec §3.1): tomesd silently does nothing here.
            finest = min(b.downsample for b in ad.attention_blocks(denoiser))
            raise NothingPatchedError(
                f"<method.max_downsample={self.max_downsample}> selects no attention block of this "
                f"{ctx.family} model: its finest attention level has downsample {finest} (SDXL has "
                f"no attention at full resolution); use method.max_downsample={finest} or more"
            )
        self._run, self._meter = run, run.meter
        return MethodReport(
            name=self.name,
            kind=self.kind,
            patched=len(layers),
            metrics={"ratio": self.ratio, "layers": float(len(layers))},
            details={"layers": layers, "skipped_blocks": skipped, "dsap": repr(self.dsap)},
        )


__all__ = ["ToMe"]
