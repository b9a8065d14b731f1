"""AT-EDM's hooks: per-call ratio, pruning, refill (wiring of :mod:`edm.methods.token.atedm`).

Every hook is a ``diffusers.hooks.ModelHook`` (or a torch forward pre-hook on the denoiser) and
talks to the attention processors of :mod:`edm.methods.token.attn_map` through a
:class:`~edm.methods.token.attn_map.MapSlot`; the math is in
:mod:`edm.methods.token.atedm_kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import ModelHook
from torch import nn

from edm.families import AttentionBlock
from edm.methods.base import RatioMeter
from edm.methods.token import atedm_kernel as K
from edm.methods.token.attn_map import MapSlot, kept_rows_output
from edm.methods.token.dsap import DSAP
from edm.methods.token.hook_args import TrajectoryRNG, hidden_arg, with_hidden
from edm.perf import PhaseTimer
from edm.state import StepTracker


@dataclass(frozen=True)
class Settings:
    """What the hooks need to know of an :class:`~edm.methods.token.atedm.ATEDM` (built once per
    ``apply``; the hooks never see the method itself)."""

    prune_ratio: float
    dsap: DSAP
    selection: str
    iters: int
    head_reduce: str
    score_source: str
    assignment: str
    cfg_shared_mask: bool
    needs_self_map: bool
    needs_cross_map: bool
    meta_cfg_batch: bool  # on meta (FLOPs counting) latents have no values: is it a CFG pair?
    # the family's pipelines batch CFG halves into one call (FLUX.1 is guidance-distilled: never,
    # so two samples with equal latents must not be mistaken for a CFG pair)
    cfg_batches: bool = True


@dataclass
class RunState:
    """State of one ``apply``, shared by every hook."""

    cfg: Settings
    tracker: StepTracker
    rng: TrajectoryRNG
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    meter: RatioMeter = field(default_factory=RatioMeter)
    cfg_batch: bool = False  # this call is an [uncond, cond] batch (equal latent halves)
    blocks: list[BlockState] = field(default_factory=list)  # every pruned block (a BlockHook each)
    prune_layers: int = 0  # LayerHooks that prune (each draws at most B x tokens random scores)
    pool: torch.Tensor | None = None  # selection=random: this call's scores, drawn before it
    pool_off: int = 0  # how much of ``pool`` the layers consumed so far in this call
    pool_state: torch.Tensor | None = None  # the generator's state before ``pool`` was drawn


@dataclass
class BlockState:
    """Per attention block (UNet ``Transformer2DModel``; MMDiT: the pruned block range)."""

    info: AttentionBlock
    ratio: float = 0.0  # this call's ratio (DSAP)
    src: torch.Tensor | None = None  # [B, N0] position of every grid token in the kept sequence


class DenoiserHook:
    """Forward pre-hook on the denoiser: each block's ratio for this call (DSAP), whether the
    call is a classifier-free-guidance batch and, for ``selection=random``, the call's random
    scores (:meth:`after` is its forward hook).

    All are decided here, outside the denoiser's ``forward``, because ``compile.enabled``
    compiles only that ``forward`` (:func:`edm.runner.compile_denoiser`): the step index is
    read in eager Python, and the traced layers see just the resulting ratio, which takes two
    values with DSAP -- so two graphs, not one per step. Random scores come from a generator,
    which a traced graph cannot hold: one ``pool`` is drawn here, an upper bound of what the
    layers need (``prune_layers x B x tokens``), and the layers take consecutive slices of it;
    :meth:`after` rewinds the generator and advances it by what was used, so the stream -- and
    on CPU every draw, whose generator is serial -- is the one the layers drew themselves before.
    """

    def __init__(self, shared: RunState):
        self.shared = shared

    def __call__(self, module, args, kwargs):
        s = self.shared
        st, c = s.tracker.state, s.cfg
        for block in s.blocks:
            block.ratio = c.dsap.ratio(c.prune_ratio, block.info, st.step_index, st.num_steps)
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if x is not None:
            s.meter.prepare(x.device)
        s.pool, s.pool_off = None, 0
        if c.selection == "random" and x is not None and x.device.type != "meta" and s.prune_layers:
            gen = s.rng.generator_for(x.device)
            s.pool_state = gen.get_state()
            tokens = x.shape[1] if x.dim() == 3 else x.shape[-2] * x.shape[-1]  # FLUX: packed
            total = s.prune_layers * x.shape[0] * tokens
            s.pool = torch.rand(total, generator=gen, device=gen.device).to(x.device)
        if not s.cfg.cfg_batches:
            s.cfg_batch = False
            return
        half = x.shape[0] // 2
        # diffusers pipelines batch CFG as torch.cat([latents] * 2): equal halves <=> CFG.
        if x.device.type == "meta":  # values unknown: FLOPs tools say what the batch is
            s.cfg_batch = bool(x.shape[0] % 2 == 0 and s.cfg.meta_cfg_batch)
        else:
            s.cfg_batch = bool(x.shape[0] % 2 == 0 and torch.equal(x[:half], x[half:]))

    def after(self, module, args, output):
        """Forward hook: the generator advanced by the random scores used, not the pool drawn."""
        s = self.shared
        if s.pool is not None:
            gen = s.rng.generator
            gen.set_state(s.pool_state)
            if s.pool_off:
                torch.rand(s.pool_off, generator=gen, device=gen.device)
            s.pool = s.pool_state = None


class BlockHook(ModelHook):
    """Starts the block's call on the full grid and checks it left the grid full (its ratio is
    set by :class:`DenoiserHook`, with which it registers the block)."""

    def __init__(self, shared: RunState, block: BlockState):
        super().__init__()
        self.shared, self.block = shared, block
        shared.blocks.append(block)

    def pre_forward(self, module, *args, **kwargs):
        self.block.src = None
        return args, kwargs

    def post_forward(self, module, output):
        assert self.block.src is None, (
            f"{self.block.info.name}: tokens were pruned, never refilled"
        )
        return output


class LayerHook(ModelHook):
    """Prunes after (``after_ffn``) or inside (``after_self_attn``) a layer, and/or refills."""

    def __init__(
        self,
        shared,
        block: BlockState,
        layer: nn.Module,
        slot: MapSlot | None,
        cross_slot: MapSlot | None,
        point: str | None,
        refill: bool,
        mmdit: bool,
    ):
        super().__init__()
        self.shared, self.block, self.layer = shared, block, layer
        self.slot, self.cross_slot, self.point, self.refill, self.mmdit = (
            slot,
            cross_slot,
            point,
            refill,
            mmdit,
        )
        self.k: int | None = None  # tokens to keep in this call (None = no pruning)
        shared.prune_layers += point is not None

    def pre_forward(self, module, *args, **kwargs):
        self.k = None
        if self.point is None:
            return args, kwargs
        self.slot.clear()  # nothing left over from an interrupted call
        x = hidden_arg(args, kwargs)
        n = x.shape[1]
        k = K.keep_count(n, self.block.ratio)
        self.shared.meter.add(n - min(k, n), n, x.device)
        if k >= n:
            return args, kwargs
        m = self.shared.cfg
        # CFG with a shared mask: the uncond half's map would be thrown away, so skip it
        cond_only = m.cfg_shared_mask and self.shared.cfg_batch
        self.slot.want_map, self.slot.cond_only = m.needs_self_map, cond_only
        if self.cross_slot is not None:
            self.cross_slot.want_map = m.needs_cross_map
            self.cross_slot.cond_only = cond_only
        if self.point == "after_ffn":
            self.k = k
            return args, kwargs
        # after_self_attn: self-attention on all tokens here, the layer then runs on kept ones.
        lay = self.layer
        xkw = dict(kwargs.get("cross_attention_kwargs") or {})
        xkw.pop("gligen", None)
        attn_out = lay.attn1(
            lay.norm1(x),
            encoder_hidden_states=None,
            attention_mask=kwargs.get("attention_mask"),
            **xkw,
        )
        # hidden state at the pruning point (only the cosine assignment reads its values; with a
        # deferred output, attn_out is None and the layer input stands in for it)
        cosine = m.assignment == "cosine" and attn_out is not None
        keep, src = self._decide(x + attn_out if cosine else x, k)
        with self.shared.timer("gather"):
            x = K.gather_tokens(x, keep)
            if attn_out is not None:
                self.slot.replay = K.gather_tokens(attn_out, keep)
        if attn_out is None:  # map_output=kept_fused: fused SDPA on the kept queries only
            self.slot.replay = kept_rows_output(self.slot, keep)
        self.block.src = src
        return with_hidden(args, kwargs, x)

    def post_forward(self, module, output):
        if self.k is not None:  # after_ffn
            hidden = output[1] if self.mmdit else output
            keep, self.block.src = self._decide(hidden, self.k)
            with self.shared.timer("gather"):
                hidden = K.gather_tokens(hidden, keep)
            output = (output[0], hidden) if self.mmdit else hidden
            self.k = None
            self._kept(keep)
        if self.refill and self.block.src is not None:
            hidden = output[1] if self.mmdit else output
            hidden = _refill(self.shared, self.block, hidden)
            output = (output[0], hidden) if self.mmdit else hidden
            self._refilled()
        return output

    def _kept(self, keep: torch.Tensor) -> None:
        """Called after pruning to ``keep [B, k]`` (FLUX: the kept tokens' rotary rows)."""

    def _refilled(self) -> None:
        """Called after the refill restored the full grid."""

    def _decide(self, hidden: torch.Tensor, k: int):
        """Scores -> keep indices -> refill sources, from this call's map(s)."""
        s, m, slot = self.shared, self.shared.cfg, self.slot
        b, n = hidden.shape[:2]
        with s.timer("gwpr"):
            if m.selection == "random":
                if s.pool is not None:  # drawn by DenoiserHook, so no generator in the graph
                    scores = s.pool[s.pool_off : s.pool_off + b * n].view(b, n)
                    s.pool_off += b * n
                elif hidden.device.type == "meta":  # values do not matter, only the FLOPs
                    scores = torch.rand(b, n, device=hidden.device)
                else:  # a call that bypassed the denoiser's hooks
                    gen = s.rng.generator_for(hidden.device)
                    scores = torch.rand(b, n, generator=gen, device=gen.device).to(hidden.device)
            elif m.score_source == "cross":
                scores = K.hits_image_scores(self.cross_slot.A, m.iters)
            elif m.head_reduce == "rms":
                scores = slot.s_rms
            else:
                scores = K.gwpr(slot.A, 1 if m.selection == "attn_colsum" else m.iters)
            scores = _both_halves(scores, b)
        with s.timer("mask"):
            shared = m.cfg_shared_mask and s.cfg_batch
            keep = K.keep_indices(scores, k, cfg_shared=shared)
            if m.assignment == "attention":
                assign = _both_halves(K.assign_by_attention(slot.A, keep[b - len(slot.A) :]), b)
            else:
                assign = K.assign_by_cosine(hidden, keep)
            if shared:
                assign = K.cfg_share(assign)
            src = K.compose_sources(self.block.src, assign)
        slot.A = slot.s_rms = None  # consumed; a deferred output stays pending
        if self.cross_slot is not None:
            self.cross_slot.clear()
        return keep, src


def _both_halves(t: torch.Tensor, b: int) -> torch.Tensor:
    """A result computed from the cond half's map only (``MapSlot.cond_only``) for a batch of
    ``b``: the shared CFG mask uses the cond half for both halves, so it is repeated."""
    return t if t.shape[0] == b else torch.cat([t, t])


def _refill(shared: RunState, block: BlockState, hidden: torch.Tensor) -> torch.Tensor:
    with shared.timer("refill"):
        out = K.refill(hidden, block.src)
    block.src = None
    return out


class RefillHook(ModelHook):
    """Refill after a linear ``proj_out`` (token-wise, so refilling after it is exact)."""

    def __init__(self, shared: RunState, block: BlockState):
        super().__init__()
        self.shared, self.block = shared, block

    def post_forward(self, module, output):
        if self.block.src is None:
            return output
        return _refill(self.shared, self.block, output)
