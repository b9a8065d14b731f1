"""How peaked a model's self-attention is: the maps and the row entropy that issue 14's
premeasurements report (``experiments/digits_gwpr_analysis.py``, ``layouts_premeasure.md``).

Pure tensor code on a diffusers ``Attention`` module's own projections, so a statistic is computed
the same way wherever it is quoted (analysis script, tests).
"""

from __future__ import annotations

import math

import torch


def self_attention_map(attn, h: torch.Tensor, stats: list | None = None) -> torch.Tensor:
    """Head-mean ``softmax(Q K^T / sqrt(d))`` ``[B, N, N]`` of a diffusers self-attention on its
    input ``h`` ``[B, N, C]``; appends the mean over rows of a row's logit std to ``stats``."""
    q, k = attn.to_q(h), attn.to_k(h)
    b, n, _ = q.shape
    q = q.view(b, n, attn.heads, -1).transpose(1, 2)
    k = k.view(b, n, attn.heads, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * attn.scale
    if stats is not None:
        stats.append(float(logits.std(-1).mean()))
    return torch.softmax(logits, dim=-1).mean(1)


def row_entropy(A: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a row-stochastic map ``[..., N]`` over ``log N``:
    1 for uniform attention, 0 for one-hot."""
    return -(A.clamp_min(1e-12).log() * A).sum(-1) / math.log(A.shape[-1])
