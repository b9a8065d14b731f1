"""AT-EDM (Wang et al., CVPR 2024): attention-driven run-time token pruning (spec §1).

Per attention block: at the configured layer(s) the self-attention map scores the image tokens
with G-WPR, the top tokens are kept (raster order), the following layers of the block run on the
kept tokens only (self-attention, cross-attention with kept queries, FFN), and before the
block's output returns to the convolutional path every pruned token is refilled with a copy of
the kept token it attended to most. DSAP prunes less during the first denoising steps.

Seams (no copied ``forward``): a map-returning attention processor on each pruning layer's
attention (:mod:`edm.methods.token.attn_map`; every other layer keeps fused SDPA), a
``diffusers.hooks.ModelHook`` on each pruning/refilling layer, on the block (per-call ratio) and on
a linear ``proj_out`` (refill after it: it is token-wise), and :class:`edm.state.StepTracker`.

Prune points (``prune_point``):

* ``after_ffn`` (the paper's, spec §1.3): the layer's output is pruned; the next layers of the
  block see the kept tokens. Useless in blocks of one layer (SD1.5, SD2.1, digits): such layers
  are skipped.
* ``after_self_attn``: the layer's self-attention runs on all tokens, then its residual stream is
  pruned, so its cross-attention and FFN already run on the kept tokens. Implemented by running
  the layer's ``attn1`` on all tokens in the layer's pre-forward hook, pruning the layer input,
  and handing the kept rows of that attention output to the layer's own ``attn1`` call.
* ``auto``: ``after_ffn`` for SDXL and SD3 (MMDiT: after the joint block), else
  ``after_self_attn``.

MMDiT (SD3/SD3.5, beyond the paper): image tokens are pruned after the joint blocks listed in
``mmdit_prune_after`` (map: the image-image part of the joint attention, rows renormalised) and
refilled after block ``mmdit_refill_after`` (default the last one, i.e. before ``norm_out``).
Text tokens are never pruned.

FLUX.1 (no FLUX setting in the paper): the same knobs and defaults over the double- then
single-stream blocks; kept tokens keep their rotary positions (:mod:`edm.methods.token.flux`).

Unknown details of the paper (spec §5) are knobs; defaults and reasons in :class:`ATEDM`.
"""

from __future__ import annotations

import logging

from torch import nn

from edm.errors import ConfigError, UnsupportedFamily
from edm.families import ARCH, METHOD_FAMILIES, adapter
from edm.methods.base import ApplyContext, MethodReport, Patcher, RuntimeMethod
from edm.methods.token.atedm_hooks import (
    BlockHook,
    BlockState,
    DenoiserHook,
    LayerHook,
    RefillHook,
    RunState,
    Settings,
)
from edm.methods.token.attn_map import (
    HEAD_REDUCE,
    MapJointAttnProcessor,
    MapSelfAttnProcessor,
    MapSlot,
    check_plain_attention,
    check_prune_layer,
)
from edm.methods.token.attn_map_triton import MAP_KERNELS, resolve as resolve_map_kernel
from edm.methods.token.dsap import DSAP
from edm.methods.token.flux import check_atedm_flux, install_atedm_flux
from edm.methods.token.hook_args import TrajectoryRNG
from edm.perf import PhaseTimer
from edm.state import StepTracker

log = logging.getLogger(__name__)

_EDM_ATEDM_HOOK = "edm_atedm"
PRUNE_POINTS = ("auto", "after_self_attn", "after_ffn")
SELECTIONS = ("gwpr", "random", "attn_colsum")
ASSIGNMENTS = ("attention", "cosine")
SCORE_SOURCES = ("self", "cross")
MAP_OUTPUTS = ("auto", "reuse", "kept_fused")
PROFILES = (False, True, "wall", "cpu", "cuda")
_AUTO_POINT = {"sdxl": "after_ffn", "sd3": "after_ffn"}


class ATEDM(RuntimeMethod):
    r"""AT-EDM token pruning, removable.

    Important args:
        prune_ratio (`float`, defaults to `0.63`): fraction of the tokens present at a pruning
            point that are pruned there. 0.63 after the first layer of every SDXL attention block
            is the paper's setting (spec §1.3); 0 is bit-identical to the dense model.
        prune_point (`str`, defaults to `"auto"`): ``after_ffn`` | ``after_self_attn`` |
            ``auto`` (``after_ffn`` for SDXL/SD3, ``after_self_attn`` for one-layer blocks:
            SD1.5, SD2.1, digits). The resolved point is in the report.
        prune_after_layers (`list[int]`, defaults to `[0]`): layer indices inside each UNet
            attention block after which to prune (spec §1.3 suggests one point, after layer 0).
        downsamples (`list[int] | None`, defaults to `None`): prune only UNet attention blocks at
            these downsample factors of the latent (1, 2, 4, 8); ``None`` = all. SDXL's
            AT-EDM† (no 64x64 pruning at 1024²) is ``[4]``.
        dsap (`dict`): see :class:`edm.methods.token.dsap.DSAP`; defaults: enabled, the first
            10 % of the steps early (fits the paper's FLOPs budgets), paper block rule,
            ``early_prune_ratio`` null. ``tau`` is not in the paper (spec §5).

    Args to tinker with (each an unknown of the paper, spec §5):
        selection (`str`, defaults to `"gwpr"`): ``gwpr`` | ``attn_colsum`` (= G-WPR with one
            iteration: column mean of the map) | ``random`` (control: random tokens, same
            refill). Compare G-WPR with ``random`` at the same ratio.
        iters (`int`, defaults to `5`): G-WPR iterations (author's Zero-TPrune prototype).
        head_reduce (`str`, defaults to `"mean"`): ``mean`` = G-WPR on the head-mean map (spec
            default; query-chunked); ``rms`` = per-head WPR, root-mean-square over heads
            (Zero-TPrune EIR; head-chunked, needs whole per-head maps per chunk).
        score_source (`str`, defaults to `"self"`): ``self`` | ``cross`` (HITS on the
            cross-attention map, the paper's ablation; only with ``after_ffn`` on UNets).
        assignment (`str`, defaults to `"attention"`): refill source of a pruned token:
            ``attention`` = the kept key it attended to most, from the pruning map (spec §1.5);
            ``cosine`` = most cosine-similar kept hidden state (the layer output for
            ``after_ffn``; for ``after_self_attn`` the residual after self-attention, or the
            layer input with an explicit ``map_output=kept_fused``, measured worse: digits
            FID 13.2 vs 9.1 at ratio 0.7). Where maps are flat (the digits
            model) the argmax is arbitrary and quality drops to chance at 30 % pruning, while
            ``cosine`` holds (experiments/results/digits_token_quality.md): prefer it there.
        cfg_shared_mask (`bool`, defaults to `True`): on a classifier-free-guidance batch
            (detected by equal latent halves, which is how diffusers batches CFG), the keep set
            and refill sources come from the conditional half and are shared by the
            unconditional half, so the guidance difference compares the same tokens; the map
            is then computed for the cond half only (the uncond half runs fused SDPA), which
            halves its cost. ``False``: each sample has its own mask and map (same ``k``).
        mmdit_prune_after (`list[int]`, defaults to `[0]`): MMDiT joint blocks after which to
            prune image tokens (negative = from the end). FLUX: indices into double- then
            single-stream blocks (19 + 38 in FLUX.1), ``[0]`` = after the first double block.
        mmdit_refill_after (`int`, defaults to `-1`): MMDiT/FLUX block after which to refill
            (-1 = last block, i.e. before ``norm_out``/``proj_out``). On FLUX, ``prune_point``,
            ``score_source``, ``map_output`` and ``downsamples`` accept only what applies there
            (``check`` raises :class:`ConfigError` otherwise).
        map_output (`str`, defaults to `"auto"`): how a pruning layer's attention output is
            made. ``reuse``: ``P V`` from the same probabilities as the map (one pass).
            ``kept_fused`` (``after_self_attn`` only): the map is computed without ``P V`` and
            the output of the *kept* rows, the only ones used afterwards, comes from fused SDPA
            on the kept queries; measured on CPU (SD1.5 64x64 level, CPU time): SDPA 0.64 s,
            map + ``P V`` 1.12 s, map alone 0.62 s + kept-row SDPA 0.23 s. ``auto``:
            ``kept_fused`` for ``after_self_attn`` with the attention refill, ``reuse``
            otherwise (the cosine refill compares every token's post-attention state).
        map_chunk_mb (`float | None`, defaults to `None`): memory of one attention-probability
            chunk; ``None`` = by device: 2 MiB on CPU (stays in cache: fastest there), 256 MiB
            on CUDA (small chunks cost thousands of kernel launches per layer).
        map_kernel (`str`, defaults to `"auto"`): ``torch`` (chunks, any device) | ``triton`` (CUDA,
            ``head_reduce=mean``: :mod:`~edm.methods.token.attn_map_triton`) | ``auto`` (triton
            where it applies, self-checked against torch at start-up).
        profile (`bool | str`, defaults to `False`): accumulate the time of map / gwpr / mask /
            gather / refill (an :class:`edm.perf.PhaseTimer`, reported by ``run_metrics()`` as
            ``time_<phase>_s``, logged as ``method/time_*``); ``True``/``"wall"`` = wall clock,
            ``"cpu"`` = this thread's CPU time (robust on an oversubscribed CPU machine),
            ``"cuda"`` = wall clock after ``torch.cuda.synchronize()`` (GPU; adds syncs).
        seed (`int`): seed of ``selection=random`` (re-seeded at every trajectory's first step).
    """

    supported_families = (*METHOD_FAMILIES, "flux")

    def __init__(
        self,
        prune_ratio: float = 0.63,
        prune_point: str = "auto",
        prune_after_layers: list[int] | tuple[int, ...] = (0,),
        downsamples: list[int] | None = None,
        selection: str = "gwpr",
        iters: int = 5,
        head_reduce: str = "mean",
        score_source: str = "self",
        assignment: str = "attention",
        cfg_shared_mask: bool = True,
        dsap: dict | DSAP | None = None,
        mmdit_prune_after: list[int] | tuple[int, ...] = (0,),
        mmdit_refill_after: int = -1,
        map_output: str = "auto",
        map_chunk_mb: float | None = None,
        map_kernel: str = "auto",
        profile: bool | str = False,
        seed: int = 0,
        name: str = "at_edm",
        tag: str | None = None,
    ):
        super().__init__()
        if not 0.0 <= float(prune_ratio) < 1.0:
            raise ConfigError("method.prune_ratio", f"must be in [0, 1), got {prune_ratio}.")
        for key, val, allowed in (
            ("prune_point", prune_point, PRUNE_POINTS),
            ("selection", selection, SELECTIONS),
            ("head_reduce", head_reduce, HEAD_REDUCE),
            ("score_source", score_source, SCORE_SOURCES),
            ("assignment", assignment, ASSIGNMENTS),
            ("map_output", map_output, MAP_OUTPUTS),
            ("map_kernel", map_kernel, MAP_KERNELS),
        ):
            if val not in allowed:
                raise ConfigError(f"method.{key}", f"unknown value {val!r}.", allowed)
        if int(iters) < 1:
            raise ConfigError("method.iters", f"must be >= 1, got {iters}.")
        layers = [int(i) for i in prune_after_layers]
        if not layers or min(layers) < 0:
            raise ConfigError("method.prune_after_layers", f"non-empty, >= 0; got {layers}.")
        if map_kernel == "triton" and head_reduce == "rms":
            raise ConfigError("method.map_kernel", "triton computes the head-mean map only.")
        if map_output == "kept_fused" and prune_point == "after_ffn":
            raise ConfigError("method.map_output", "kept_fused needs prune_point after_self_attn.")
        if score_source == "cross" and prune_point == "after_self_attn":
            raise ConfigError("method.score_source", "cross needs prune_point after_ffn/auto.")
        if score_source == "cross" and head_reduce == "rms":
            raise ConfigError("method.head_reduce", "rms is for score_source=self.")
        if downsamples is not None and any(int(d) not in (1, 2, 4, 8) for d in downsamples):
            raise ConfigError("method.downsamples", f"got {downsamples}.", (1, 2, 4, 8))
        if map_chunk_mb is not None and float(map_chunk_mb) <= 0:
            raise ConfigError("method.map_chunk_mb", "must be > 0 (or null = by device).")
        self.prune_ratio = float(prune_ratio)
        self.prune_point = prune_point
        self.prune_after_layers = sorted(set(layers))
        self.downsamples = None if downsamples is None else [int(d) for d in downsamples]
        self.selection, self.iters, self.head_reduce = selection, int(iters), head_reduce
        self.score_source, self.assignment = score_source, assignment
        self.cfg_shared_mask = bool(cfg_shared_mask)
        self.dsap = DSAP.from_cfg(dsap if dsap is not None else {})
        self.mmdit_prune_after = [int(i) for i in mmdit_prune_after]
        self.mmdit_refill_after = int(mmdit_refill_after)
        if profile not in PROFILES:
            raise ConfigError("method.profile", f"got {profile!r}.", PROFILES)
        self.profile = {False: None, True: "wall"}.get(profile, profile)
        self.map_output = map_output
        self.map_chunk_mb = None if map_chunk_mb is None else float(map_chunk_mb)
        self.map_kernel, self._kernel = map_kernel, "torch"  # resolved per run (device) in install
        self.seed = int(seed)
        self.name, self.tag = name, tag or f"atedm-r{self.prune_ratio}"
        self.resolved_point: str | None = None
        self._timer: PhaseTimer | None = None

    def check(self, family: str) -> None:
        super().check(family)
        if ARCH[family] == "flux":
            check_atedm_flux(self.prune_point, self.score_source, self.map_output,
                             self.downsamples)

    @property
    def needs_self_map(self) -> bool:
        scored = self.selection != "random" and self.score_source == "self"
        return scored or self.assignment == "attention"

    def compile_blockers(self) -> list[str]:
        why = [(bool(self.profile), f"method.profile={self.profile} reads a clock per phase")]
        return [f"<method={self.name}> {text}" for on, text in why if on]

    @property
    def needs_cross_map(self) -> bool:
        return self.selection != "random" and self.score_source == "cross"

    def install(self, pipe, patcher: Patcher, ctx: ApplyContext) -> MethodReport:
        self._kernel = resolve_map_kernel(self.map_kernel, self.head_reduce, ctx.device)
        ad = adapter(ctx.family)
        denoiser = ad.denoiser(pipe)
        tracker = StepTracker(denoiser, getattr(pipe, "scheduler", None))
        patcher.add_handle(tracker)
        settings = Settings(
            prune_ratio=self.prune_ratio, dsap=self.dsap, selection=self.selection,
            iters=self.iters, head_reduce=self.head_reduce, score_source=self.score_source,
            assignment=self.assignment, cfg_shared_mask=self.cfg_shared_mask,
            needs_self_map=self.needs_self_map, needs_cross_map=self.needs_cross_map,
            meta_cfg_batch=ctx.meta_cfg_batch, cfg_batches=ARCH[ctx.family] != "flux")
        shared = RunState(settings, tracker, TrajectoryRNG(tracker, self.seed),
                          timer=PhaseTimer(self.profile))
        self._meter, self._timer = shared.meter, shared.timer
        hook = DenoiserHook(shared)
        patcher.add_handle(denoiser.register_forward_pre_hook(hook, with_kwargs=True))
        patcher.add_handle(denoiser.register_forward_hook(hook.after))
        blocks = ad.attention_blocks(denoiser)
        if not blocks:
            raise UnsupportedFamily(f"<method={self.name}> {type(denoiser).__name__} has no "
                                    "attention blocks")
        if ARCH[ctx.family] in ("mmdit", "flux"):
            point = "after_ffn"
            layers, skipped = self._install_dit(ctx.family, denoiser, blocks, patcher, shared)
        else:
            point = self.prune_point
            if point == "auto":
                point = _AUTO_POINT.get(ctx.family, "after_self_attn")
            if point == "after_ffn" and self.map_output == "kept_fused":
                raise ConfigError("method.map_output",
                                  f"kept_fused needs after_self_attn, {ctx.family} uses {point}.")
            layers, skipped = self._install_unet(denoiser, blocks, patcher, shared, point)
        self.resolved_point = point
        for name, why in skipped:
            log.info("AT-EDM: not pruning %s: %s", name, why)
        return MethodReport(
            name=self.name,
            kind=self.kind,
            patched=patcher.count if layers else 0,
            metrics={"prune_ratio": self.prune_ratio, "pruning_layers": float(len(layers))},
            details={
                "prune_point": point, "pruning_layers": layers, "skipped": skipped,
                "selection": self.selection, "assignment": self.assignment,
                "head_reduce": self.head_reduce, "iters": self.iters,
                "cfg_shared_mask": self.cfg_shared_mask,
                "map_output": self._resolved_map_output(point), "dsap": repr(self.dsap),
                "map_kernel": self._kernel,
            },
        )

    def run_metrics(self) -> dict[str, float]:
        out = super().run_metrics()
        if self._timer is not None:
            out.update(self._timer.metrics())
        return out

    def _resolved_map_output(self, point: str) -> str:
        if self.map_output != "auto":
            return self.map_output
        fused = point == "after_self_attn" and self.assignment == "attention"
        return "kept_fused" if fused else "reuse"

    def _map_slot(self, shared: RunState, defer: bool = False) -> MapSlot:
        timer = shared.timer if self.profile else None
        return MapSlot(head_reduce=self.head_reduce, iters=self.iters, chunk_mb=self.map_chunk_mb,
                       kernel=self._kernel, timer=timer, defer_output=defer)

    def _install_unet(self, denoiser, blocks, patcher, shared, point):
        layers, skipped = [], []
        for info in blocks:
            if self.downsamples is not None and info.downsample not in self.downsamples:
                skipped.append((info.name, f"downsample {info.downsample} not in {self.downsamples}"))
                continue
            n_layers = len(info.layers)
            last_useful = n_layers - 1 if point == "after_self_attn" else n_layers - 2
            points = [i for i in self.prune_after_layers if i <= last_useful]
            if not points:
                why = f"{n_layers} layer(s): nothing after {point} of layers "
                skipped.append((info.name, why + str(self.prune_after_layers)))
                continue
            block = BlockState(info)
            linear_out = isinstance(getattr(info.module, "proj_out", None), nn.Linear)
            for i, (lname, lay) in enumerate(info.layers):
                prunes = i in points
                refills = i == n_layers - 1 and not linear_out
                if not (prunes or refills):
                    continue
                slot = cross = None
                if prunes:
                    check_prune_layer(lay, lname, point)
                    slot = self._map_slot(shared, self._resolved_map_output(point) == "kept_fused")
                    patcher.set_processor(
                        lay.attn1, MapSelfAttnProcessor(slot, lay.attn1.get_processor())
                    )
                    if self.score_source == "cross":
                        check_plain_attention(lay.attn2, f"{lname}.attn2")
                        cross = self._map_slot(shared)
                        patcher.set_processor(
                            lay.attn2, MapSelfAttnProcessor(cross, lay.attn2.get_processor())
                        )
                    layers.append(lname)
                at = point if prunes else None
                hook = LayerHook(shared, block, lay, slot, cross, at, refills, mmdit=False)
                patcher.register_hook(lay, hook, _EDM_ATEDM_HOOK)
            if linear_out:
                patcher.register_hook(
                    info.module.proj_out, RefillHook(shared, block), _EDM_ATEDM_HOOK
                )
            patcher.register_hook(info.module, BlockHook(shared, block), _EDM_ATEDM_HOOK)
        return layers, skipped

    def _install_dit(self, family, denoiser, blocks, patcher, shared):
        if self.score_source == "cross":
            raise ConfigError("method.score_source", "MMDiT has joint attention only; use self.")
        n = len(blocks)
        refill = self.mmdit_refill_after % n if -n <= self.mmdit_refill_after < n else None
        points = sorted({i % n for i in self.mmdit_prune_after if -n <= i < n})
        if refill is None or not points or max(points) >= refill:
            raise ConfigError(
                "method.mmdit_prune_after",
                f"need prune blocks < refill block in range({n}); got "
                f"{self.mmdit_prune_after} / {self.mmdit_refill_after}",
            )
        if ARCH[family] == "flux":
            layers = install_atedm_flux(denoiser, blocks, points, refill, patcher, shared,
                                        lambda: self._map_slot(shared), _EDM_ATEDM_HOOK)
        else:
            layers = self._install_mmdit(denoiser, blocks, points, refill, patcher, shared)
        return layers, [
            (b.name, "outside the pruned range") for b in blocks if b.name not in layers
        ]

    def _install_mmdit(self, denoiser, blocks, points, refill, patcher, shared):
        block = BlockState(blocks[points[0]])
        layers = []
        for i in sorted(set(points) | {refill}):
            info = blocks[i]
            slot = None
            if i in points:
                check_plain_attention(info.module.attn, f"{info.name}.attn")
                slot = self._map_slot(shared)
                attn = info.module.attn
                patcher.set_processor(attn, MapJointAttnProcessor(slot, attn.get_processor()))
                layers.append(info.name)
            at = "after_ffn" if i in points else None
            hook = LayerHook(shared, block, info.module, slot, None, at, i == refill, mmdit=True)
            patcher.register_hook(info.module, hook, _EDM_ATEDM_HOOK)
        patcher.register_hook(denoiser, BlockHook(shared, block), _EDM_ATEDM_HOOK)
        return layers
