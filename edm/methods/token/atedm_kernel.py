"""AT-EDM kernels: G-WPR token scores, keep masks, and similarity-based refill (spec §1.4-1.5).

Pure tensor code: no diffusers, no modules, no Python control flow on tensor *values*, so every
function also runs on the ``meta`` device (FLOPs counting of full-size models).

Shapes: ``B`` batch, ``h`` heads, ``N`` tokens at the pruning point, ``k`` kept tokens,
``N0`` tokens of the full grid (before the first pruning point of a block), ``C`` channels.
Index tensors are ``int64``. Keep indices are sorted ascending, so kept tokens stay in raster
order (spec §1.8) and the refill is a single ``gather``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def keep_count(n: int, prune_ratio: float) -> int:
    """Tokens kept when ``prune_ratio`` of ``n`` are pruned (at least one is always kept)."""
    return max(1, n - round(n * prune_ratio))


def gwpr(A: torch.Tensor, iters: int = 5) -> torch.Tensor:
    """Generalized Weighted Page Rank scores of the key tokens of an attention graph.

    WPR (Zero-TPrune; spec §1.4): ``s0 = 1/N``, ``s <- A^T s`` for ``iters`` iterations, i.e.
    ``s_j <- sum_i A[i, j] s_i``: a key is important if important queries attend to it. With a
    row-stochastic ``A`` the scores stay a distribution (no damping term).

    Args:
        A: ``[..., N, N]`` attention probabilities, rows = queries (any leading dims, e.g.
            ``[B, N, N]`` head-mean or ``[B, h, N, N]`` per head).
        iters: power iterations ``K`` (author's prototype: 5; 1 = attention column mean).

    Returns:
        ``[..., N]`` scores (float32).
    """
    n = A.shape[-1]
    s = torch.full(A.shape[:-1], 1.0 / n, dtype=torch.float32, device=A.device)
    A = A.float()
    for _ in range(iters):
        s = torch.matmul(s.unsqueeze(-2), A).squeeze(-2)  # s^T A == (A^T s)^T
    return s


def hits_image_scores(
    Ac: torch.Tensor, iters: int = 5, text_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-attention variant of G-WPR (ablation; spec §1.4): HITS on the bipartite graph.

    With uniform text scores ``Ac s_txt`` is constant (rows sum to 1), so the image and text
    scores are iterated alternately: ``s_txt <- Ac^T s_img``, ``s_img <- Ac s_txt``, each
    renormalised to sum 1.

    Args:
        Ac: ``[B, N, M]`` cross-attention probabilities (image queries x text keys).
        iters: alternations.
        text_weight: optional ``[B, M]`` or ``[M]`` non-negative weights of text tokens
            (0 excludes start/padding tokens), applied to ``s_txt`` every iteration.

    Returns:
        ``[B, N]`` image-token scores summing to 1.
    """
    Ac = Ac.float()
    s_img = torch.full(Ac.shape[:-1], 1.0 / Ac.shape[-2], dtype=torch.float32, device=Ac.device)
    for _ in range(max(1, iters)):
        s_txt = torch.matmul(s_img.unsqueeze(-2), Ac).squeeze(-2)
        if text_weight is not None:
            s_txt = s_txt * text_weight.to(s_txt)
        s_txt = s_txt / s_txt.sum(-1, keepdim=True).clamp_min(1e-12)
        s_img = torch.matmul(Ac, s_txt.unsqueeze(-1)).squeeze(-1)
        s_img = s_img / s_img.sum(-1, keepdim=True).clamp_min(1e-12)
    return s_img


def rms_over_heads(s_heads: torch.Tensor) -> torch.Tensor:
    """``[B, h, N]`` per-head scores -> ``[B, N]`` RMS over heads (Zero-TPrune's EIR)."""
    return s_heads.float().pow(2).mean(1).sqrt()


def cfg_share(t: torch.Tensor) -> torch.Tensor:
    """Copy the conditional (second) half of a CFG batch over both halves.

    diffusers pipelines batch ``[uncond, cond]``; sharing keeps both halves' kept tokens and
    refill sources aligned, so the guidance difference compares the same tokens.
    """
    half = t.shape[0] // 2
    cond = t[half:]
    return torch.cat([cond, cond], 0)


def keep_indices(scores: torch.Tensor, k: int, cfg_shared: bool = False) -> torch.Tensor:
    """Top-``k`` tokens per sample, in ascending (raster) order.

    Args:
        scores: ``[B, N]`` importance (higher = keep).
        k: tokens to keep, the same for every sample so the gather is dense.
        cfg_shared: ``B`` is an ``[uncond, cond]`` CFG batch; take the mask from the cond half.

    Returns:
        ``[B, k]`` int64 indices, sorted ascending.
    """
    if cfg_shared:
        scores = cfg_share(scores)
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def _rank_of_kept(keep: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, n]``: position of each token inside the kept list (garbage for pruned tokens)."""
    rank = torch.zeros(keep.shape[0], n, dtype=torch.long, device=keep.device)
    ar = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    return rank.scatter(1, keep, ar)


def _is_kept(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(keep.shape[0], n, dtype=torch.bool, device=keep.device)
    return mask.scatter(1, keep, True)


def assign_by_attention(A: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Refill source of every token: ``c(j) = argmax_{i in kept} A[j, i]`` (spec §1.5).

    The pruned query ``j`` copies the kept key it attended to most, read from the same map that
    chose the mask (no extra attention work). Kept tokens map to themselves.

    Args:
        A: ``[B, N, N]`` attention probabilities (rows = queries).
        keep: ``[B, k]`` sorted keep indices.

    Returns:
        ``[B, N]`` int64 positions *in the kept sequence* (0..k-1).
    """
    n = A.shape[-1]
    cols = A.gather(2, keep.unsqueeze(1).expand(-1, A.shape[1], -1))  # [B, N, k]
    best = cols.argmax(-1)
    return torch.where(_is_kept(keep, n), _rank_of_kept(keep, n), best)


def assign_by_cosine(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Refill source by cosine similarity of hidden states (SiTo-style option, spec §1.5).

    Args:
        x: ``[B, N, C]`` hidden states at the pruning point.
        keep: ``[B, k]`` sorted keep indices.

    Returns:
        ``[B, N]`` int64 positions in the kept sequence.
    """
    n = x.shape[1]
    xn = F.normalize(x.float(), dim=-1)
    kept = xn.gather(1, keep.unsqueeze(-1).expand(-1, -1, xn.shape[-1]))
    best = torch.matmul(xn, kept.transpose(1, 2)).argmax(-1)  # [B, N]
    return torch.where(_is_kept(keep, n), _rank_of_kept(keep, n), best)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]``: ``[B, N, C]``, ``[B, k]`` -> ``[B, k, C]``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def compose_sources(src: torch.Tensor | None, assign: torch.Tensor) -> torch.Tensor:
    """Chain refill sources across successive pruning points of one block.

    Args:
        src: ``[B, N0]`` position of every full-grid token in the current sequence (``None`` =
            identity: nothing pruned yet).
        assign: ``[B, N]`` position of every current token in the next (kept) sequence.

    Returns:
        ``[B, N0]`` position of every full-grid token in the kept sequence.
    """
    return assign if src is None else assign.gather(1, src)


def refill(x_kept: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Similarity-based copy back to the full grid: ``out[b, j] = x_kept[b, src[b, j]]``.

    Args:
        x_kept: ``[B, k, C]`` features of the kept tokens.
        src: ``[B, N0]`` from :func:`compose_sources`.

    Returns:
        ``[B, N0, C]`` in raster order; every pruned token equals some kept token.
    """
    return gather_tokens(x_kept, src)
