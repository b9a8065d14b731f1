"""Attention that also returns its map, computed once, in memory-bounded chunks (spec §1.8).

Fused kernels (SDPA, flash, xFormers) never return the attention probabilities, and a second
attention pass just to get them erased AT-EDM's gain in the paper's own latency table. So at a
pruning layer the processor here computes ``softmax(Q K^T / sqrt(d))`` explicitly, chunk by
chunk, and uses the same probabilities for the layer's output ``P V`` while accumulating the
head-aggregated map. Every other layer keeps the model's own (fused) processor.

* :func:`attention_with_map` is pure tensor code (runs on ``meta`` for FLOPs counting).
* :class:`MapSelfAttnProcessor` (UNet ``attn1``/``attn2``) and :class:`MapJointAttnProcessor`
  (MMDiT joint attention) are attention processors (``attn.set_processor``): when their
  :class:`MapSlot` asks for a map they compute it, otherwise they delegate to the processor
  they replaced, so an idle layer is bit-identical to the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from edm.errors import UnsupportedFamily
from edm.methods.token.atedm_kernel import gwpr

HEAD_REDUCE = ("mean", "rms")
# MiB of one probability chunk by device type (``chunk_mb=None``); meta counts like CPU.
AUTO_CHUNK_MB = {"cpu": 2.0, "meta": 2.0, "cuda": 256.0}


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def attention_with_map(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_map: int | None = None,
    head_reduce: str = "mean",
    iters: int = 5,
    chunk_mb: float | None = None,
    need_out: bool = True,
    map_from: int = 0,
    kernel: str = "torch",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``softmax(q k^T / sqrt(d)) v`` plus the head-aggregated attention map, in one pass.

    Memory is bounded by ``chunk_mb`` for the probability chunk ``[bc, hc, qc, Nk]`` plus the
    ``[B, n, n]`` map itself: whole maps of several heads/samples when they fit, else query
    blocks of one head of one sample. ``head_reduce="rms"`` always holds whole per-head maps
    (one head at least), because the per-head WPR iterates on them.

    Args:
        q: ``[B, h, Nq, d]``; k, v: ``[B, h, Nk, d]``.
        n_map: the map covers queries ``< n_map`` and keys ``< n_map`` (MMDiT: the image tokens
            that precede the text tokens); rows are renormalised to sum 1 when keys are cut.
            ``None`` = all (requires ``Nq == Nk`` only for G-WPR, not here).
        head_reduce: ``mean`` (map = head mean) or ``rms`` (also per-head WPR scores
            aggregated by root-mean-square over heads, returned as the third value).
        iters: WPR iterations of the per-head scores (``rms`` only).
        chunk_mb: size of one probability chunk in MiB (float32 elements); ``None`` = by device
            (:data:`AUTO_CHUNK_MB`): 1-2 MiB is fastest on CPU (cache-resident), larger chunks
            only cost memory bandwidth there; on a GPU small chunks mean thousands of kernel
            launches per layer, so chunks are large.
        need_out: ``False`` = the map only (``out`` is ``None``), for callers that need the
            output of a few rows only (:func:`kept_rows_output`).
        map_from: first token of the mapped range ``[map_from, map_from + n_map)`` of queries
            and keys (FLUX puts the text tokens first: the image tokens start after them).
        kernel: ``torch`` (this function's chunks) | ``triton`` (CUDA, ``mean`` only: the map from
            :func:`~edm.methods.token.attn_map_triton.head_mean_map`, the output from fused SDPA;
            the per-head probabilities never reach memory).

    Returns:
        ``(out [B, h, Nq, d] or None, A [B, nq, nk] float32, s_rms [B, nq] or None)``.
    """
    if head_reduce not in HEAD_REDUCE:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCE}, got {head_reduce!r}")
    if kernel == "triton":
        if head_reduce != "mean":
            raise ValueError("kernel='triton' computes the head-mean map only")
        from edm.methods.token.attn_map_triton import head_mean_map

        A = head_mean_map(q, k, map_from=map_from, n_map=n_map)
        return (F.scaled_dot_product_attention(q, k, v) if need_out else None), A, None
    b, h, nq, d = q.shape
    nk = k.shape[2]
    m0 = map_from
    mq = nq - m0 if n_map is None else min(n_map, nq - m0)
    mk = nk - m0 if n_map is None else min(n_map, nk - m0)
    q = q * (1.0 / math.sqrt(d))  # fold the SDPA scale into q: one small pass instead of B·h·N²
    kt = k.transpose(-1, -2)
    out = torch.empty_like(q) if need_out else None
    A = torch.zeros(b, mq, mk, dtype=torch.float32, device=q.device)
    s_sq = (
        torch.zeros(b, mq, dtype=torch.float32, device=q.device) if head_reduce == "rms" else None
    )
    # Chunk [bc, hc, qc, Nk]: small enough to stay in cache (measured on CPU: ~1-2 MiB chunks
    # are ~2x faster than 32 MiB ones, the QK^T product being bound by writing the scores).
    if chunk_mb is None:
        chunk_mb = AUTO_CHUNK_MB.get(q.device.type, AUTO_CHUNK_MB["cpu"])
    budget = max(1, int(chunk_mb * 2**20 / 4))
    per_head = nq * nk
    if head_reduce == "rms" or per_head <= budget:
        qc = nq  # whole maps (rms: per-head WPR needs them, whatever the budget)
        hc = max(1, min(h, budget // per_head))
        bc = max(1, min(b, budget // (h * per_head))) if hc == h else 1
    else:
        bc, hc, qc = 1, 1, max(1, budget // nk)
    for b0, b1 in _chunks(b, bc):
        for h0, h1 in _chunks(h, hc):
            for q0, q1 in _chunks(nq, qc):
                P = torch.matmul(q[b0:b1, h0:h1, q0:q1], kt[b0:b1, h0:h1]).softmax(-1)
                if out is not None:
                    out[b0:b1, h0:h1, q0:q1] = torch.matmul(P, v[b0:b1, h0:h1])
                r0, r1 = max(q0, m0), min(q1, m0 + mq)
                if r1 > r0:  # rows of this chunk that belong to the map
                    rows = P[:, :, r0 - q0 : r1 - q0, m0 : m0 + mk]
                    A[b0:b1, r0 - m0 : r1 - m0] += rows[:, 0] if h1 - h0 == 1 else rows.sum(1)
                if s_sq is not None:
                    Ph = P[:, :, m0 : m0 + mq, m0 : m0 + mk]
                    if mk < nk:
                        Ph = Ph / Ph.sum(-1, keepdim=True)
                    s_sq[b0:b1] += gwpr(Ph, iters).pow(2).sum(1)
    if mk < nk:
        A = A / A.sum(-1, keepdim=True)
    else:
        A = A / h
    s_rms = None if s_sq is None else (s_sq / h).sqrt()
    return out, A, s_rms


def _attention_with_map_cfg(slot, q, k, v, **kw):
    """:func:`attention_with_map` on the rows the slot wants mapped (``slot.cond_only``: the
    cond half of a CFG batch), fused SDPA for the others; ``A``/``s_rms`` cover mapped rows."""
    if not slot.cond_only:
        return attention_with_map(q, k, v, **kw)
    half = q.shape[0] // 2
    out_c, A, s_rms = attention_with_map(q[half:], k[half:], v[half:], **kw)
    if out_c is None:
        return None, A, s_rms
    out_u = F.scaled_dot_product_attention(q[:half], k[:half], v[:half])
    return torch.cat([out_u.to(out_c.dtype), out_c], 0), A, s_rms


@dataclass
class MapSlot:
    """Per-layer mailbox between an attention processor and the hooks around its layer.

    Attributes:
        want_map: the next call must compute its map (set by a hook before the call).
        head_reduce, iters, chunk_mb, kernel: see :func:`attention_with_map`.
        A: ``[B, n, n]`` map of the last mapped call (consumed by the hook).
        s_rms: per-head RMS scores of that call (``head_reduce="rms"``).
        replay: an already computed attention output to return instead of computing again
            (prune point "after self-attention": the hook ran attention on all tokens, the
            layer then runs on the kept ones and receives the kept rows of that output).
        defer_output: the mapped call computes the map only and returns ``None``, leaving its
            projected ``(attn, q, k, v)`` in ``pending`` for :func:`kept_rows_output`.
        cond_only: the batch is an ``[uncond, cond]`` CFG batch whose mask comes from the cond
            half (set per call by the hook): the map (and its ``P V``) is computed for the cond
            half only, ``A`` then has ``B/2`` rows, and the uncond half's output comes from
            fused SDPA. Its map would be discarded, so this halves the map's cost.
        timer: optional callable ``timer(name)`` returning a context manager (overhead
            breakdown); ``None`` = no timing.
    """

    want_map: bool = False
    head_reduce: str = "mean"
    iters: int = 5
    chunk_mb: float | None = None
    kernel: str = "torch"
    A: torch.Tensor | None = None
    s_rms: torch.Tensor | None = None
    replay: torch.Tensor | None = None
    defer_output: bool = False
    cond_only: bool = False
    pending: tuple | None = None
    timer: Any = None

    def clear(self) -> None:
        self.want_map = self.cond_only = False
        self.A = self.s_rms = self.replay = self.pending = None


def check_plain_attention(attn, name: str) -> None:
    """Raise :class:`UnsupportedFamily` if ``attn`` uses features these processors lack."""
    bad = [
        f
        for f, ok in (
            ("spatial_norm", getattr(attn, "spatial_norm", None) is None),
            ("group_norm", getattr(attn, "group_norm", None) is None),
            ("residual_connection", not getattr(attn, "residual_connection", False)),
            ("rescale_output_factor", getattr(attn, "rescale_output_factor", 1.0) == 1.0),
            ("norm_cross", getattr(attn, "norm_cross", None) is None),
        )
        if not ok
    ]
    if bad:
        raise UnsupportedFamily(f"AT-EDM cannot map attention {name}: it uses {', '.join(bad)}")


def check_prune_layer(layer: torch.nn.Module, name: str, point: str) -> None:
    """A UNet transformer layer AT-EDM can prune at ``point`` (plain attention; after_self_attn:
    the layer-norm block whose forward the hooks split)."""
    check_plain_attention(layer.attn1, f"{name}.attn1")
    if point == "after_self_attn":
        ok = (getattr(layer, "norm_type", None) == "layer_norm" and layer.pos_embed is None
              and not layer.only_cross_attention)
        if not ok:
            raise UnsupportedFamily(
                f"AT-EDM prune_point=after_self_attn needs plain layer-norm blocks; {name} is not"
            )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _time(slot: MapSlot, name: str):
    import contextlib

    return slot.timer(name) if slot.timer is not None else contextlib.nullcontext()


class MapSelfAttnProcessor:
    """Processor for a UNet ``Attention`` (self- or cross-attention) that can return its map.

    Args:
        slot: the layer's :class:`MapSlot`.
        fallback: the processor it replaces (called whenever no map is wanted).
    """

    def __init__(self, slot: MapSlot, fallback):
        self.slot = slot
        self.fallback = fallback

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs
    ):
        slot = self.slot
        if slot.replay is not None:
            out, slot.replay = slot.replay, None
            assert out.shape[:2] == hidden_states.shape[:2], "replayed output does not fit"
            return out
        if not slot.want_map:
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        if attention_mask is not None:
            raise UnsupportedFamily("AT-EDM's mapped attention does not support attention masks")
        slot.want_map = False
        # timed as a whole (projections included), comparable with a dense attn1 call
        with _time(slot, "map"):
            return self._mapped(attn, hidden_states, encoder_hidden_states)

    def _mapped(self, attn, hidden_states, encoder_hidden_states):
        slot = self.slot
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        out, slot.A, slot.s_rms = _attention_with_map_cfg(
            slot,
            q,
            k,
            v,
            head_reduce=slot.head_reduce,
            iters=slot.iters,
            chunk_mb=slot.chunk_mb,
            kernel=slot.kernel,
            need_out=not slot.defer_output,
        )
        if out is None:
            slot.pending = (attn, q, k, v)
            return None
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def kept_rows_output(slot: MapSlot, keep: torch.Tensor) -> torch.Tensor:
    """Attention output of the kept query rows of a deferred mapped call, ``[B, k, C]``.

    At a prune point after self-attention only the kept rows of the output are ever used (the
    pruned rows are refilled from kept tokens later), so instead of ``P V`` for all rows
    (measured on CPU: ``P V`` through explicit probabilities costs as much as the map itself)
    the kept rows are computed by fused SDPA: map + ``k/N`` of a fused pass is cheaper than map
    + ``P V``.
    """
    attn, q, k, v = slot.pending
    slot.pending = None
    with _time(slot, "map"):
        idx = keep[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
        out = F.scaled_dot_product_attention(q.gather(2, idx), k, v)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class MapJointAttnProcessor:
    """Processor for an MMDiT joint ``Attention`` (image + text streams) that can return the
    image-image part of its map (rows renormalised over image keys).

    Args:
        slot: the block's :class:`MapSlot`.
        fallback: the processor it replaces.
    """

    def __init__(self, slot: MapSlot, fallback):
        self.slot = slot
        self.fallback = fallback

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs
    ):
        slot = self.slot
        if not slot.want_map or encoder_hidden_states is None:
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs
            )
        if attention_mask is not None:
            raise UnsupportedFamily("AT-EDM's mapped attention does not support attention masks")
        slot.want_map = False
        with _time(slot, "map"):
            return self._mapped(attn, hidden_states, encoder_hidden_states)

    def _mapped(self, attn, hidden_states, encoder_hidden_states):
        slot = self.slot
        n_img = hidden_states.shape[1]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        e = encoder_hidden_states
        cq, ck, cv = attn.add_q_proj(e), attn.add_k_proj(e), attn.add_v_proj(e)
        cq, ck, cv = (_heads(t, attn.heads) for t in (cq, ck, cv))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out, slot.A, slot.s_rms = _attention_with_map_cfg(
            slot,
            q,
            k,
            v,
            n_map=n_img,
            head_reduce=slot.head_reduce,
            iters=slot.iters,
            chunk_mb=slot.chunk_mb,
            kernel=slot.kernel,
        )
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx
