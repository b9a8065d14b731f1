"""FLUX.1 wiring of the token methods: AT-EDM's pruned block range and ToMe's merged layers.

Both FLUX block types are called with image tokens as ``hidden_states`` and text tokens as
``encoder_hidden_states`` (keywords) and return ``(encoder_hidden_states, hidden_states)``, the
same contract as an SD3 joint block; the single-stream block concatenates ``[text, image]``
inside and splits the result again, so hooks around whole blocks only ever see image tokens.
Only the attention inside a block sees both, always text first, with the rotary embedding the
model computed once per call for ``[text, image]`` (:mod:`edm.methods.token.flux_attn`).

* **AT-EDM.** ``mmdit_prune_after`` / ``mmdit_refill_after`` index the forward-ordered list of
  every FLUX block (double-stream, then single-stream). At a pruning block the map is the
  image-image part of its attention (rotary applied); after the block the image tokens are
  pruned (per-sample keep indices, raster order) and the kept tokens' rotary rows are gathered
  (:class:`FluxTokens`). Every following block of the range gets that rotary in place of the
  model's (a hook rewrites its ``image_rotary_emb`` keyword) and runs
  :class:`~edm.methods.token.flux_attn.FluxTokenAttnProcessor`. The refill block's output is
  refilled to the full image grid in raster order, so ``norm_out``/``proj_out`` see every
  token, and blocks after it get the model's rotary again.
* **ToMe.** Per block, one matching from the block's image-token input (tomesd's metric). The
  attention's image tokens are merged (double-stream: its ``hidden_states``; single-stream: the
  image part of its ``[text, image]`` input; text is never merged) and unmerged at its output;
  ``merge_mlp`` does the same for the image MLP (double-stream ``ff``; single-stream
  ``proj_mlp``, whose ``proj_out`` then reads the unmerged activations). **A merged token takes
  its destination's rotary position** (a merge group's mean is stored in the destination's
  slot; averaging cos/sin would not be a rotation at all), unmerged tokens keep their own. The
  grid for the 2x2 destination cells comes from ``img_ids`` (:class:`FluxGrid`).

FLUX.1 is guidance-distilled: no call is a CFG pair (``Settings.cfg_batches`` is off).
"""

from __future__ import annotations

import math

import torch
from diffusers.hooks import ModelHook

from edm.errors import ConfigError
from edm.methods.token.atedm_hooks import BlockHook, BlockState, LayerHook
from edm.methods.token.attn_map import check_plain_attention
from edm.methods.token.flux_attn import FluxTokenAttnProcessor, FluxTokens, gather_rotary
from edm.methods.token.hook_args import hidden_arg, with_hidden

# positional order of FluxTransformerBlock / FluxSingleTransformerBlock.forward arguments
_BLOCK_ARGS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb")


def _block_arg(args: tuple, kwargs: dict, name: str):
    i = _BLOCK_ARGS.index(name)
    return args[i] if len(args) > i else kwargs.get(name)


def _with_block_arg(args: tuple, kwargs: dict, name: str, value):
    i = _BLOCK_ARGS.index(name)
    if len(args) > i:
        return (*args[:i], value, *args[i + 1 :]), kwargs
    return args, {**kwargs, name: value}


# ------------------------------------------------------------------------------------ AT-EDM


def check_atedm_flux(prune_point: str, score_source: str, map_output: str, downsamples) -> None:
    """Raise :class:`ConfigError` for AT-EDM knobs that have no FLUX meaning (before loading)."""
    for key, val, allowed, why in (
        ("prune_point", prune_point, ("auto", "after_ffn"),
         "FLUX blocks are pruned after the whole block"),
        ("score_source", score_source, ("self",), "FLUX has joint attention only"),
        ("map_output", map_output, ("auto", "reuse"), "kept_fused needs after_self_attn"),
    ):
        if val not in allowed:
            raise ConfigError(f"method.{key}", f"{val!r} is not supported on flux: {why}.",
                              allowed)
    if downsamples is not None:
        raise ConfigError("method.downsamples", "selects UNet levels; on flux choose blocks with "
                          "method.mmdit_prune_after.", [None])


class FluxLayerHook(LayerHook):
    """AT-EDM's layer hook on a FLUX block of the pruned range: also keeps the rotary of the
    kept tokens (:class:`FluxTokens`) and hands it to the block in place of the model's.

    Args:
        tokens: the layout shared with the range's attention processors.
        first: the first block of the range (every call starts there with all tokens).
        (others: :class:`~edm.methods.token.atedm_hooks.LayerHook`; FLUX has no cross map.)
    """

    def __init__(self, shared, block, layer, slot, point, refill, tokens: FluxTokens,
                 first: bool):
        super().__init__(shared, block, layer, slot, None, point, refill, mmdit=True)
        self.tokens, self.first = tokens, first
        self._model_rotary = None

    def pre_forward(self, module, *args, **kwargs):
        t = self.tokens
        if self.first:  # nothing left over from an interrupted call
            t.reset()
        t.text_len = _block_arg(args, kwargs, "encoder_hidden_states").shape[1]
        if t.rotary is None:
            self._model_rotary = _block_arg(args, kwargs, "image_rotary_emb")
        else:
            args, kwargs = _with_block_arg(args, kwargs, "image_rotary_emb", t.rotary)
        return super().pre_forward(module, *args, **kwargs)

    def _kept(self, keep: torch.Tensor) -> None:
        t = self.tokens
        current = t.rotary if t.rotary is not None else self._model_rotary
        with self.shared.timer("gather"):
            t.rotary = gather_rotary(current, t.text_len, keep)  # keep indexes current tokens
        self._model_rotary = None

    def _refilled(self) -> None:
        self.tokens.reset()


def install_atedm_flux(denoiser, blocks, points, refill, patcher, shared, make_slot,
                       hook_name: str) -> list[str]:
    """AT-EDM hooks and processors on FLUX blocks ``points[0] .. refill`` (forward order).

    Args:
        blocks: :meth:`edm.families.FluxAdapter.attention_blocks` (double, then single).
        points: sorted block indices after which image tokens are pruned; ``refill``: the
            block after which they are refilled (``> max(points)``).
        make_slot: returns a fresh :class:`~edm.methods.token.attn_map.MapSlot`.

    Returns:
        the names of the pruning blocks.
    """
    tokens = FluxTokens()
    block = BlockState(blocks[points[0]])  # one ratio (DSAP) for the whole range, as MMDiT
    layers = []
    for i in range(points[0], refill + 1):
        info = blocks[i]
        attn = info.module.attn
        slot = None
        if i in points:
            check_plain_attention(attn, f"{info.name}.attn")
            slot = make_slot()
            layers.append(info.name)
        # every block of the range after the first runs on kept tokens: per-sample rotary
        patcher.set_processor(attn, FluxTokenAttnProcessor(attn.get_processor(), tokens, slot))
        hook = FluxLayerHook(shared, block, info.module, slot, "after_ffn" if i in points else
                             None, i == refill, tokens, first=i == points[0])
        patcher.register_hook(info.module, hook, hook_name)
    patcher.register_hook(denoiser, BlockHook(shared, block), hook_name)
    return layers


# ------------------------------------------------------------------------------------ ToMe


class FluxGrid:
    """Forward pre-hook on the FLUX transformer: the image-token grid of each call.

    FLUX's latents are packed tokens ``[B, N, C]``, so the grid is read from ``img_ids``
    (``(0, row, col)`` per token); it must be a raster ``h x w`` grid (an extra reference
    image, as FLUX.1 Kontext appends, is not). On the meta device (FLOPs counting) ids have no
    values and a square grid is assumed.
    """

    def __init__(self, denoiser):
        self.hw: tuple[int, int] | None = None
        self.raster = True
        self._handle = denoiser.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("img_ids")
        self.hw, self.raster = None, True
        if ids is None or ids.device.type == "meta":
            return
        ids = ids[0] if ids.ndim == 3 else ids
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        h, w = int(rows.max()) + 1, int(cols.max()) + 1
        n = ids.shape[0]
        raster = torch.arange(n, device=ids.device)
        self.raster = h * w == n and torch.equal(rows * w + cols, raster)
        self.hw = (h, w) if self.raster else None

    def grid(self, n: int, where: str) -> tuple[int, int]:
        if self.hw is not None and self.hw[0] * self.hw[1] == n:
            return self.hw
        side = math.isqrt(n)
        if self.raster and self.hw is None and side * side == n:
            return side, side
        raise RuntimeError(
            f"<method=tome> {where}: {n} image tokens are not the raster grid of this call's "
            f"img_ids ({self.hw if self.raster else 'not a raster grid'})"
        )

    def remove(self) -> None:
        self._handle.remove()


def check_tome_flux(merge_crossattn: bool) -> None:
    if merge_crossattn:
        raise ConfigError("method.merge_crossattn", "FLUX has no cross-attention to merge "
                          "(use merge_attn / merge_mlp).", [False])


class FluxMergeHook(ModelHook):
    """Merges the image tokens of a FLUX submodule's input and unmerges its output.

    The input is ``[text, image]`` (single-stream attention and ``proj_mlp``) or image tokens
    only (double-stream attention and ``ff``); text tokens pass through. For an attention
    (``rotary=True``) the merged tokens also get their rotary rows: text rows, then the row of
    the token each merged slot stands for (a group's destination).

    Args:
        match: the layer's ``_Match`` (``merge``, ``unmerge``, ``order``, ``shape`` = (B, N)).
        where: module name for errors.
        rotary: rewrite the ``image_rotary_emb`` keyword.
    """

    def __init__(self, match, where: str, rotary: bool):
        super().__init__()
        self.match, self.where, self.rotary = match, where, rotary
        self.text_len = 0

    def pre_forward(self, module, *args, **kwargs):
        m = self.match
        if m.shape is None or m.order is None:  # outside the block call, or nothing merged
            return args, kwargs
        x = hidden_arg(args, kwargs)
        b, n = m.shape
        if x.shape[0] != b or x.shape[1] < n:
            raise RuntimeError(f"<method=tome> {self.where} got {tuple(x.shape[:2])} tokens, "
                               f"the matching is for {n} image tokens of {b} samples")
        t = self.text_len = x.shape[1] - n
        img = m.merge(x[:, t:])
        args, kwargs = with_hidden(args, kwargs, torch.cat([x[:, :t], img], 1) if t else img)
        rot = kwargs.get("image_rotary_emb")
        if self.rotary and rot is not None:
            ctx = kwargs.get("encoder_hidden_states")
            text_len = ctx.shape[1] if ctx is not None else t
            kwargs = {**kwargs, "image_rotary_emb": gather_rotary(rot, text_len, m.order)}
        return args, kwargs

    def post_forward(self, module, output):
        m = self.match
        if m.shape is None or m.order is None:
            return output
        if isinstance(output, tuple):  # double-stream attention: (image, text)
            return (m.unmerge(output[0]), *output[1:])
        t = self.text_len
        return torch.cat([output[:, :t], m.unmerge(output[:, t:])], 1) if t else m.unmerge(output)


def install_tome_flux_layer(patcher, layer, layer_name: str, match, merge_attn: bool,
                            merge_mlp: bool, hook_name: str) -> list[str]:
    """Merge hooks (and, for the attention, the per-sample-rotary processor) of one FLUX block;
    returns the merged submodule names."""
    single = hasattr(layer, "proj_mlp")
    merged = []
    for name, on in (("attn", merge_attn), ("proj_mlp" if single else "ff", merge_mlp)):
        if not on:
            continue
        sub = getattr(layer, name)
        if name == "attn":
            patcher.set_processor(sub, FluxTokenAttnProcessor(sub.get_processor()))
        hook = FluxMergeHook(match, f"{layer_name}.{name}", rotary=name == "attn")
        patcher.register_hook(sub, hook, hook_name)
        merged.append(name)
    return merged
