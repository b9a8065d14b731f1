"""Token Merging kernel: bipartite soft matching with random 2x2 destinations (pure tensors).

ToMe for Stable Diffusion (Bolya & Hoffman, CVPR-W 2023, arXiv 2303.17604, §3). The token grid
``h x w`` is tiled into ``sy x sx`` cells; one token per cell is a *destination* (picked at random,
or the top-left one), all others are *sources*. Every source is matched to its most cosine-similar
destination; the ``r`` sources with the highest similarity are averaged into their destination
(the destination included), the rest are kept. ``unmerge`` copies each destination's output back
to the sources merged into it, so a layer run on ``N - r`` tokens yields an ``N``-token output.

On identical inputs and generator state this reproduces ``tomesd.merge.bipartite_soft_matching_random2d``
exactly (tested against the installed package). It is written independently and does less work:
the index bookkeeping is composed once per matching, so ``merge`` is two gathers and a
scatter-reduce and ``unmerge`` is a single gather (tomesd: four gathers, a zero fill and three
scatters). No diffusers import; every step also runs on the meta device (FLOP counting).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Merge = Callable[..., torch.Tensor]


def identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """The merge/unmerge used when nothing is merged."""
    return x


def draw_destinations(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None,
                      device) -> torch.Tensor:
    """The random destination of every ``sy x sx`` cell: ``[h//sy, w//sx, 1]`` int64, one
    ``torch.randint`` draw from ``generator`` on its device (tomesd's draw), moved to ``device``."""
    gen_device = generator.device if generator is not None else "cpu"
    pick = torch.randint(sy * sx, (h // sy, w // sx, 1), generator=generator, device=gen_device)
    return pick.to(device)


def partition_dst(
    h: int, w: int, sx: int, sy: int, use_rand: bool, generator: torch.Generator | None, device,
    pick: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``h x w`` raster into destination and source token indices.

    Args:
        h, w: token grid size.
        sx, sy: cell size; one destination per full ``sy x sx`` cell. Rows/columns left over when
            the cell does not divide the grid are all sources.
        use_rand: pick the destination uniformly at random inside each cell (one
            ``torch.randint(sy*sx, (h//sy, w//sx, 1))`` draw from ``generator``); else the top-left.
        generator: RNG for the draw; its device is where the draw happens.
        device: device of the returned indices.
        pick: the draw made beforehand (:func:`draw_destinations`), so that no generator is
            touched here (``torch.compile`` cannot trace one); ``generator`` is then unused.

    Returns:
        ``(dst_idx [num_dst], src_idx [N - num_dst])``, int64 raster indices. Their order is
        that of torch's default sort (not raster order); any order gives the same merge up to
        floating-point summation order.
    """
    hc, wc = h // sy, w // sx
    if use_rand:
        if pick is None:
            pick = draw_destinations(h, w, sx, sy, generator, device)
    else:
        pick = torch.zeros(hc, wc, 1, dtype=torch.int64, device=device)
    # 0 marks a destination, 1 a source; sorting lists destinations first. The default
    # (unstable) sort is deliberate: it orders equal keys exactly as tomesd's argsort does, which
    # parity with tomesd needs (a stable sort gives the same sets in another order). Sorting
    # rather than ``nonzero`` keeps shapes static, so this also runs on the meta device.
    cell = torch.ones(hc, wc, sy * sx, dtype=torch.int64, device=device)
    cell.scatter_(2, pick, 0)
    grid = torch.ones(h, w, dtype=torch.int64, device=device)
    grid[: hc * sy, : wc * sx] = (
        cell.view(hc, wc, sy, sx).transpose(1, 2).reshape(hc * sy, wc * sx)
    )
    order = grid.flatten().argsort()
    num_dst = hc * wc
    return order[:num_dst], order[num_dst:]


def bipartite_merge(
    metric: torch.Tensor,
    w: int,
    h: int,
    r: int,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    generator: torch.Generator | None = None,
    return_order: bool = False,
    pick: torch.Tensor | None = None,
) -> tuple[Merge, Merge] | tuple[Merge, Merge, torch.Tensor | None]:
    """Bipartite soft matching with random ``sy x sx`` destinations.

    Args:
        metric: ``[B, N, C]`` similarity features, ``N == h * w`` in raster order (ToMe-SD uses the
            transformer block's input).
        w, h: token grid width and height.
        r: number of tokens to remove; clamped to the number of sources. ``r <= 0`` -> identity.
        sx, sy: destination cell size (2, 2 in ToMe-SD; the maximum ``r`` is then ``0.75 N``).
        use_rand: random destination per cell (ToMe-SD default) or the top-left token.
        generator: RNG for the destination draw (only used with ``use_rand``).
        pick: destinations drawn beforehand (:func:`partition_dst`), instead of ``generator``.
        return_order: also return ``order [B, N - r]``: the raster index of the token each
            merged slot is (its destination for a merged group), e.g. to give merged tokens the
            rotary position of their destination (FLUX). ``None`` when nothing is merged.

    Returns:
        ``(merge, unmerge)``: ``merge(x [B, N, C'], mode="mean") -> [B, N - r, C']`` with the
        kept sources first and the destinations last; ``unmerge(y [B, N - r, C']) -> [B, N, C']``.
        With ``return_order``, ``(merge, unmerge, order)``.
    """
    B, N, _ = metric.shape
    if r <= 0:
        return (identity, identity, None) if return_order else (identity, identity)
    assert N == h * w, f"metric has {N} tokens, grid is {h}x{w}"

    with torch.no_grad():
        dst_idx, src_idx = partition_dst(h, w, sx, sy, use_rand, generator, metric.device, pick)
        num_dst, num_src = dst_idx.numel(), src_idx.numel()
        r = min(r, num_src)

        m = metric / metric.norm(dim=-1, keepdim=True)
        C = m.shape[-1]
        a = m.gather(1, src_idx.view(1, -1, 1).expand(B, num_src, C))
        b = m.gather(1, dst_idx.view(1, -1, 1).expand(B, num_dst, C))
        best, best_dst = (a @ b.transpose(-1, -2)).max(dim=-1)  # [B, num_src]
        rank = best.argsort(dim=-1, descending=True)  # most similar sources first
        kept_rank, merged_rank = rank[:, r:], rank[:, :r]  # positions among the sources

        # Absolute token indices (into the N-token raster), composed once here so that the
        # closures below never index through the source list again.
        src_abs = src_idx.expand(B, num_src)
        kept_abs = src_abs.gather(1, kept_rank)  # [B, num_src - r]
        merged_abs = src_abs.gather(1, merged_rank)  # [B, r]
        into = best_dst.gather(1, merged_rank)  # [B, r], destination slot of each merged source
        num_kept = num_src - r
        gather_abs = torch.cat([kept_abs, dst_idx.expand(B, num_dst)], dim=1)  # [B, N - r]
        # Where each of the N tokens reads its value from in the merged sequence.
        back = torch.empty(B, N, dtype=torch.int64, device=metric.device)
        back.scatter_(1, gather_abs, torch.arange(N - r, device=metric.device).expand(B, N - r))
        back.scatter_(1, merged_abs, into + num_kept)

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        c = x.shape[-1]
        out = x.gather(1, gather_abs.unsqueeze(-1).expand(B, N - r, c))
        src = x.gather(1, merged_abs.unsqueeze(-1).expand(B, r, c))
        # In place on the destination slice: saves the concatenation copy.
        out[:, num_kept:].scatter_reduce_(1, into.unsqueeze(-1).expand(B, r, c), src, mode)
        return out

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        return y.gather(1, back.unsqueeze(-1).expand(B, N, y.shape[-1]))

    return (merge, unmerge, gather_abs) if return_order else (merge, unmerge)
