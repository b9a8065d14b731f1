"""Structured OBS: remove whole input columns (FFN neurons) or column groups (attention heads).

Pure tensor math, no diffusers import (OBS-Diff paper §4.3, spec §2.4). The pruned layer is the
*consumer* of a structure -- ``ff.net.2`` for FFN neurons, ``attn.to_out.0`` for heads -- and its
input columns are the neurons / heads. Removing columns S of ``W`` and compensating the rest with
the inverse Hessian of the layer's input is the multi-column OBS step::

    Err_S = W_S / U_SS (sequentially, U = chol(H^-1_perm, upper)),  W_rest -= Err_S @ U_S,rest

Column scores (paper Eq. 6, one neuron):   e_q = sum_rows W[:, q]^2 / [H^-1]_qq
Group scores (paper Eq. 7, one head j):    e_j = sum_{k in j} sum_rows W[:, k]^2 / diag(chol(H^-1_jj))_k^2

FFN neurons go in rounds of ``cnt`` columns (SlimGPT schedule: blocksize = (target - 512) // 2,
cnt = min(left, max(blocksize, 64), 1024), blocksize halves towards 0); heads go one per round.
``H^-1`` is recomputed after every round on the surviving columns (a pruned column is decoupled,
so inverting the surviving sub-matrix equals the reference's "zero the rows, set diag to 1").

A consumer can hold several structures side by side: FLUX's single-stream ``proj_out`` reads
``cat([attention heads, MLP neurons])``. :func:`obs_prune_structured` then takes ``span``, the
column range whose groups may be removed, and ``removed``, columns an earlier solve on the same
layer already took out. Candidates are ranked only inside ``span``, but the scores and the
compensation use the inverse Hessian of *every* surviving column of the layer: that is the OBS
step for "remove these columns, refit the rest" on the layer as it is, so heads are compensated
by MLP columns too (and vice versa). Restricting ``H`` to the span's diagonal block would ignore
the attention/MLP input correlations and give a worse refit (a least-squares fit over a subset
of the surviving columns); ``tests/test_flux_structured.py`` checks the full-layer refit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edm.methods.weight.obs import prepare_hessian, reconstruction_error  # re-exported (__all__)

__all__ = [
    "StructuredResult",
    "ffn_round_sizes",
    "obs_prune_heads_joint",
    "obs_prune_structured",
    "reciprocal_rank_fusion",
    "reconstruction_error",
    "rrf_pick",
]


@dataclass
class StructuredResult:
    """Outcome of a structured OBS solve.

    Attributes:
        W: compensated fp32 weight ``[rows, cols]`` (pruned columns exactly 0); a list with one
            weight per stream for :func:`obs_prune_heads_joint`.
        pruned: sorted pruned group indices (neurons for ``group_size=1``, heads otherwise).
        score: sum of the Eq. 6/7 scores of the pruned groups when they were chosen.
        rounds: number of re-inversion rounds.
    """

    W: torch.Tensor | list[torch.Tensor]
    pruned: torch.Tensor
    score: float
    rounds: int


def ffn_round_sizes(target: int) -> list[int]:
    """Columns removed per round for FFN neurons (SlimGPT schedule used by OBS-Diff)."""
    sizes, blocksize, done = [], (target - 512) // 2, 0
    while done < target:
        cnt = min(target - done, max(blocksize, 64), 1024)
        sizes.append(cnt)
        done += cnt
        blocksize = (blocksize - 512) // 2
    return sizes


def _prepare(W: torch.Tensor, H: torch.Tensor, percdamp: float):
    """fp32 copies with dead inputs fixed (shared with the unstructured solver), then damping."""
    W, H, _ = prepare_hessian(W, H)
    if percdamp > 0:
        H.diagonal().add_(percdamp * torch.diag(H).mean())
    return W, H


def _inverse(H: torch.Tensor) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(H))


def _group_scores(W: torch.Tensor, Hinv: torch.Tensor, g: int) -> torch.Tensor:
    """Eq. 6 (g = 1) or Eq. 7 (g = head_dim) scores of the groups of ``W``'s columns."""
    if g == 1:
        return (W**2 / torch.diag(Hinv)).sum(0)
    n = W.shape[1] // g
    blocks = torch.stack([Hinv[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(n)])
    d = torch.diagonal(torch.linalg.cholesky(blocks), dim1=-2, dim2=-1).reshape(-1) ** 2
    return (W**2 / d).sum(0).view(n, g).sum(1)


def _remove(W: torch.Tensor, Hinv: torch.Tensor, chosen: torch.Tensor, compensate: bool):
    """Sequential OBS removal of local columns ``chosen`` (in that order) from ``W`` in place.

    W: [rows, m] surviving columns; Hinv: [m, m] their inverse Hessian; chosen: [cnt] local idx.
    """
    m, cnt = W.shape[1], chosen.numel()
    keep = torch.ones(m, dtype=torch.bool, device=W.device)
    keep[chosen] = False
    order = torch.cat([chosen, torch.nonzero(keep).flatten()])
    U = torch.linalg.cholesky(Hinv[order][:, order], upper=True)[:cnt]  # [cnt, m]
    W1 = W[:, chosen].clone()
    Err = torch.zeros_like(W1)
    for i in range(cnt):
        Err[:, i] = W1[:, i] / U[i, i]
        if compensate:  # local update of the not-yet-removed chosen columns
            W1[:, i:] -= Err[:, i : i + 1] @ U[i : i + 1, i:cnt]
    if compensate:  # global update of every surviving column
        W[:, order[cnt:]] -= Err @ U[:, cnt:]
    W[:, chosen] = 0


def _check(W: torch.Tensor, H: torch.Tensor, group_size: int, num_prune: int,
           span: tuple[int, int] | None = None) -> int:
    cols = W.shape[1]
    assert H.shape == (cols, cols), f"H must be [{cols}, {cols}], got {tuple(H.shape)}"
    lo, hi = span if span is not None else (0, cols)
    assert 0 <= lo < hi <= cols, f"span {span} outside the {cols} columns"
    width = hi - lo
    assert group_size >= 1 and width % group_size == 0, \
        f"{width} columns not divisible by {group_size}"
    n = width // group_size
    assert 0 <= num_prune < n, f"cannot prune {num_prune} of {n} groups (keep at least one)"
    return n


def _expand(groups: torch.Tensor, g: int) -> torch.Tensor:
    """Group indices -> column indices (group-major)."""
    return (groups[:, None] * g + torch.arange(g, device=groups.device)).flatten()


def obs_prune_structured(
    W: torch.Tensor,
    H: torch.Tensor,
    num_prune: int,
    group_size: int = 1,
    percdamp: float = 0.01,
    no_compensate: bool = False,
    span: tuple[int, int] | None = None,
    removed: torch.Tensor | None = None,
) -> StructuredResult:
    """Remove ``num_prune`` column groups of ``W`` with OBS compensation.

    Args:
        W: ``[rows, cols]`` consumer weight (any dtype; solved in fp32, not modified).
        H: ``[cols, cols]`` Hessian of the consumer's input (not modified).
        num_prune: groups to remove (neurons, or heads); at least one group must stay.
        group_size: 1 for FFN neurons (SlimGPT round schedule), ``head_dim`` for heads (one head
            per round).
        percdamp: damping as a fraction of mean(diag H); 0.01 as in OBS-Diff/SparseGPT. Raise it
            if the Cholesky factorisation fails.
        no_compensate: only zero the columns (OBS-Diff's ``--no_compensate`` ablation; the
            ranking still uses the Hessian). The reconstruction error is then never smaller.
        span: ``(lo, hi)`` columns whose groups are candidates (group ``j`` = columns
            ``lo + j*group_size ...``); ``None`` = all columns. Columns outside it are
            compensated, never removed (see the module docstring).
        removed: column indices (outside ``span``) already removed from ``W`` by an earlier
            solve; they are left as they are (zero) and take no part in scores or compensation.

    Returns:
        ``pruned`` holds group indices relative to ``span``.
    """
    n = _check(W, H, group_size, num_prune, span)
    lo = span[0] if span is not None else 0
    W, H = _prepare(W, H, percdamp)
    g = group_size
    # surviving columns outside the span: part of every inverse and compensation, never chosen
    outside = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    outside[lo : lo + n * g] = False
    if removed is not None and removed.numel():
        removed = removed.to(W.device)
        assert not (~outside[removed]).any(), "removed columns must lie outside the span"
        outside[removed] = False
    rest = torch.nonzero(outside).flatten()  # empty without span / removed: the plain solve
    alive = torch.ones(n, dtype=torch.bool, device=W.device)  # groups still present
    rounds = ffn_round_sizes(num_prune) if g == 1 else [1] * num_prune
    score = 0.0
    for cnt in rounds:
        groups = torch.nonzero(alive).flatten()
        m = groups.numel() * g
        cols = torch.cat([_expand(groups, g) + lo, rest])  # candidates first, then the rest
        Hinv = _inverse(H[cols][:, cols])
        Wa = W[:, cols]
        s = _group_scores(Wa[:, :m], Hinv[:m, :m], g)
        local = torch.argsort(s)[:cnt]  # ascending score = cheapest first
        score += float(s[local].sum())
        _remove(Wa, Hinv, _expand(local, g), compensate=not no_compensate)
        W[:, cols] = Wa
        alive[groups[local]] = False
    return StructuredResult(W=W, pruned=torch.nonzero(~alive).flatten(), score=score, rounds=len(rounds))


def reciprocal_rank_fusion(rankings: list[list[int]], k: int = 60) -> dict[int, float]:
    """Reciprocal rank fusion: S_j = sum over rankings of 1 / (k + rank_j + 1), rank 0-based.

    Each ranking lists items best-first (here: lowest pruning error first), so the item with the
    highest fused score is the best candidate for removal in every stream at once.
    """
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking):
            fused[int(item)] = fused.get(int(item), 0.0) + 1.0 / (k + rank + 1)
    return fused


def rrf_pick(rankings: list[list[int]], k: int = 60) -> int:
    """The item with the highest fused score; ties go to the item met first, i.e. ranked better
    in the first ranking (the image stream). The official code takes the head of
    ``sorted(fused, key=fused.get, reverse=True)``, a stable sort over the dict's insertion
    order; ``max`` returns the first maximum in that same order."""
    fused = reciprocal_rank_fusion(rankings, k)
    return max(fused, key=fused.__getitem__)


def obs_prune_heads_joint(
    Ws: list[torch.Tensor],
    Hs: list[torch.Tensor],
    num_prune: int,
    head_dim: int,
    percdamp: float = 0.01,
    no_compensate: bool = False,
    rrf_k: int = 60,
) -> StructuredResult:
    """Prune the same heads from several streams (MMDiT joint attention), one head per round.

    Each stream (``to_out.0`` with the image-token Hessian, ``to_add_out`` with the text-token
    Hessian) ranks the surviving heads by Eq. 7 on its own; the rankings are fused with
    :func:`reciprocal_rank_fusion` and the head with the highest fused score (:func:`rrf_pick`, ties
    as the official code) is removed from every stream, each compensated with its own Hessian.

    Args:
        Ws, Hs: per-stream consumer weights ``[rows_s, heads*head_dim]`` and input Hessians.
        num_prune: heads to remove; head_dim: columns per head.
        percdamp, no_compensate: as in :func:`obs_prune_structured`.
        rrf_k: RRF constant; 60 in OBS-Diff (and the RRF paper).
    """
    assert len(Ws) == len(Hs) >= 1, "one Hessian per stream"
    n = _check(Ws[0], Hs[0], head_dim, num_prune)
    for W, H in zip(Ws[1:], Hs[1:]):
        assert _check(W, H, head_dim, num_prune) == n, "streams must have the same head count"
    prepared = [_prepare(W, H, percdamp) for W, H in zip(Ws, Hs)]
    alive = torch.ones(n, dtype=torch.bool, device=Ws[0].device)
    score = 0.0
    for _ in range(num_prune):
        groups = torch.nonzero(alive).flatten()
        cols = _expand(groups, head_dim)
        invs, rankings, scores = [], [], []
        for W, H in prepared:
            Hinv = _inverse(H[cols][:, cols])
            s = _group_scores(W[:, cols], Hinv, head_dim)
            invs.append(Hinv)
            scores.append(s)
            rankings.append(torch.argsort(s).tolist())
        local = rrf_pick(rankings, k=rrf_k)
        score += float(sum(s[local] for s in scores))
        for (W, _), Hinv in zip(prepared, invs):
            Wa = W[:, cols]
            _remove(Wa, Hinv, _expand(torch.tensor([local], device=W.device), head_dim),
                    compensate=not no_compensate)
            W[:, cols] = Wa
        alive[groups[local]] = False
    return StructuredResult(
        W=[W for W, _ in prepared], pruned=torch.nonzero(~alive).flatten(), score=score,
        rounds=num_prune,
    )


