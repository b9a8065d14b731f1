"""FLUX.1 attention on a token subset: per-sample rotary positions, optionally with the map.

FLUX computes its rotary embedding once per call, ``(cos, sin)`` of shape ``[S_txt + N, D]``
from ``txt_ids``/``img_ids``, and hands the same tensors to every block; diffusers'
``FluxAttnProcessor`` broadcasts them over the batch (``cos[None, :, None, :]``). A token method
that keeps a different image-token subset per sample (AT-EDM) or merges tokens per sample (ToMe)
breaks that: each kept token must keep *its own* position, so the rotary becomes per sample,
``[B, S_txt + k, D]``, which diffusers' processor cannot take. Hence:

* :func:`gather_rotary` builds the rotary of a token subset (text rows unchanged and first, then
  the rows of the selected image tokens), from the model's shared rotary or an already gathered
  one (successive pruning points compose);
* :class:`FluxTokenAttnProcessor` (set with ``attn.set_processor``) runs FLUX attention with a
  per-sample rotary, and at an AT-EDM pruning block also returns the image-image part of the
  attention map (rows renormalised over image keys, rotary applied, as the model attends). With
  the model's own shared rotary and no map wanted it calls the processor it replaced, so blocks
  that see every token stay bit-identical to the dense model.

Both block types go through it: the double-stream attention receives image tokens as
``hidden_states`` and text as ``encoder_hidden_states`` and returns ``(image, text)``; the
single-stream attention receives ``[text, image]`` as one sequence and returns it whole.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edm.errors import UnsupportedFamily
from edm.methods.token import attn_map
from edm.methods.token.attn_map import MapSlot

Rotary = tuple[torch.Tensor, torch.Tensor]


def per_sample(rotary: Rotary | None) -> bool:
    """Whether ``rotary`` is a per-sample ``[B, S, D]`` pair (ours) rather than the model's."""
    return rotary is not None and rotary[0].dim() == 3


def gather_rotary(rotary: Rotary, text_len: int, idx: torch.Tensor) -> Rotary:
    """The rotary of ``[text, image tokens idx]``, per sample.

    Args:
        rotary: ``(cos, sin)``, each ``[S_txt + N, D]`` (the model's) or ``[B, S_txt + N, D]``.
        text_len: ``S_txt``; text rows come first and are kept as they are.
        idx: ``[B, k]`` indices into the ``N`` image tokens (AT-EDM keep indices; ToMe: the
            token each merged slot stands for, its destination for a merged group).

    Returns:
        ``(cos, sin)``, each ``[B, S_txt + k, D]``.
    """
    b = idx.shape[0]

    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.expand(b, -1, -1) if t.dim() == 2 else t
        img = t[:, text_len:].gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        return torch.cat([t[:, :text_len], img], 1)

    return one(rotary[0]), one(rotary[1])


def rotate(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotary position embedding of ``x [B, S, H, D]`` with FLUX's interleaved pairs.

    Each channel pair ``(x_2i, x_2i+1)`` is rotated by the angle whose cosine and sine are in
    ``cos``/``sin`` (both repeated per pair): ``x * cos + (-x_2i+1, x_2i) * sin``, in float32 as
    the model does. ``rotary`` is the model's ``[S, D]`` or a per-sample ``[B, S, D]`` pair.
    """
    cos, sin = rotary
    cos, sin = (t[None, :, None] if t.dim() == 2 else t[:, :, None] for t in (cos, sin))
    cos, sin = cos.to(x.device), sin.to(x.device)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(3)
    return (x.float() * cos + swapped.float() * sin).to(x.dtype)


@dataclass
class FluxTokens:
    """The token layout of the current FLUX call, shared by hooks and processors.

    Attributes:
        text_len: text tokens of the call (the single-stream attention sees text and image as
            one sequence and needs it to find the image part of its map).
        rotary: per-sample rotary of the current (pruned) image tokens; ``None`` while every
            block sees all tokens and the model's own rotary is right.
    """

    text_len: int = 0
    rotary: Rotary | None = None

    def reset(self) -> None:
        self.rotary = None


def _timed(slot: MapSlot, name: str):
    return slot.timer(name) if slot.timer is not None else contextlib.nullcontext()


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, S, H, D]


class FluxTokenAttnProcessor:
    """Processor for a ``FluxAttention`` whose tokens are a per-sample subset.

    Args:
        fallback: the processor it replaces; called whenever the rotary is the model's own and
            no map is wanted (bit-identical to the dense model there).
        tokens: the call's :class:`FluxTokens` (text length for a single-stream map).
        slot: AT-EDM pruning block only: the :class:`~edm.methods.token.attn_map.MapSlot` that
            asks for the image-image map; ``None`` for ToMe and for blocks that only run on
            kept tokens.
    """

    def __init__(self, fallback, tokens: FluxTokens | None = None, slot: MapSlot | None = None):
        self.fallback, self.tokens, self.slot = fallback, tokens, slot

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Rotary | None = None,
    ):
        slot = self.slot
        want_map = slot is not None and slot.want_map
        if not want_map and not per_sample(image_rotary_emb):
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        if attention_mask is not None:
            raise UnsupportedFamily("FLUX token methods do not support attention masks")
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        q, k, v = self._qkv(attn, hidden_states, encoder_hidden_states if joint else None)
        if image_rotary_emb is not None:
            q, k = rotate(q, image_rotary_emb), rotate(k, image_rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        # the text prefix: the double-stream attention is told, the single-stream one is not
        n_txt = encoder_hidden_states.shape[1] if joint else None
        if want_map:
            n_txt = self.tokens.text_len if n_txt is None else n_txt
            slot.want_map = False
            with _timed(slot, "map"):
                out, slot.A, slot.s_rms = attn_map._attention_with_map_cfg(
                    slot, q, k, v, n_map=q.shape[2] - n_txt, map_from=n_txt,
                    head_reduce=slot.head_reduce, iters=slot.iters, chunk_mb=slot.chunk_mb,
                    kernel=slot.kernel,
                )
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if not joint:  # single-stream: the block splits text and image itself
            return out
        txt, img = out[:, :n_txt], out[:, n_txt:]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())

    @staticmethod
    def _qkv(attn, x: torch.Tensor, ctx: torch.Tensor | None):
        """Projected, QK-normalised ``[B, S, H, D]`` queries/keys/values, text tokens first."""
        d = attn.head_dim
        q, k = attn.norm_q(_heads(attn.to_q(x), d)), attn.norm_k(_heads(attn.to_k(x), d))
        v = _heads(attn.to_v(x), d)
        if ctx is None:
            return q, k, v
        cq = attn.norm_added_q(_heads(attn.add_q_proj(ctx), d))
        ck = attn.norm_added_k(_heads(attn.add_k_proj(ctx), d))
        cv = _heads(attn.add_v_proj(ctx), d)
        return torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
