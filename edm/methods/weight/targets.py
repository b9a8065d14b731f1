"""Structured targets: which modules form one prunable head / neuron group (data only).

Kept apart from :mod:`edm.methods.weight.slicing` (the loop over a denoiser, masking, slicing)
so that architecture-specific target builders (:mod:`edm.methods.weight.slicing_flux`) and the
generic code both import it, without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

Named = tuple[str, nn.Linear]


@dataclass(eq=False)  # identity semantics: targets are dict keys
class StructuredTarget:
    """One prunable structure (see the module docstring).

    Attributes:
        name: module path of the attention / feed-forward module in the denoiser (a FLUX
            single-stream MLP, which is no module of its own: ``<block>.proj_mlp``).
        kind: ``heads`` or ``ffn``.
        group: target group it belongs to (``attn``, ``ff``, ``context``).
        layer_index: transformer layer index in forward order (for first/last exclusion).
        module: the ``Attention`` or ``FeedForward`` module.
        consumers: ``(name, linear)`` whose input columns are pruned; need input Hessians.
        producers: ``(name, linear, gated)`` whose output rows are sliced; ``gated`` = GEGLU.
        group_size: columns per group (head_dim, or 1 for neurons).
        pruned: pruned group indices, set by a method's ``choose`` (or :func:`mask_target`).
        col_offset, num_cols: the consumers' input columns this target owns,
            ``[col_offset, col_offset + num_cols)``; ``num_cols=None`` = all of them (every
            target but FLUX's single-stream ones, which share ``proj_out``).
        siblings: the other targets that own columns of the same consumers (updated by slicing:
            their ``col_offset`` moves when columns before it go).
        resync: called after slicing to bring shape attributes the forward does not read but
            the module keeps (``mlp_hidden_dim``...) in line with the new shapes.
    """

    name: str
    kind: str
    group: str
    layer_index: int
    module: nn.Module
    consumers: list[Named]
    producers: list[tuple[str, nn.Linear, bool]]
    group_size: int
    pruned: list[int] | None = None
    info: dict = field(default_factory=dict)
    col_offset: int = 0
    num_cols: int | None = None
    siblings: list[StructuredTarget] = field(default_factory=list, repr=False)  # cyclic
    resync: Callable[[], None] | None = field(default=None, repr=False)

    @property
    def num_groups(self) -> int:
        cols = self.consumers[0][1].in_features if self.num_cols is None else self.num_cols
        return cols // self.group_size

    @property
    def span(self) -> tuple[int, int] | None:
        """Consumer column range ``(lo, hi)`` of this target; ``None`` = all columns."""
        if self.num_cols is None:
            return None
        return self.col_offset, self.col_offset + self.num_cols

    def columns(self, groups) -> torch.Tensor:
        """Consumer input columns of ``groups`` (group indices of this target)."""
        return group_columns(self, list(groups)) + self.col_offset

    def consumer_weight(self, lin: nn.Linear) -> torch.Tensor:
        """The columns of consumer ``lin`` this target owns: ``[rows, num_groups*group_size]``."""
        lo, hi = self.span or (0, lin.in_features)
        return lin.weight[:, lo:hi]

    def removed_columns(self) -> torch.Tensor:
        """Consumer columns already pruned (not yet sliced) by :attr:`siblings`."""
        cols = [s.columns(s.pruned) for s in self.siblings if s.pruned]
        return torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)

    def num_to_prune(self, sparsity: float) -> int:
        """round(groups * sparsity) as the reference code, keeping at least one group."""
        return max(0, min(round(self.num_groups * sparsity), self.num_groups - 1))


def attn_target(name, attn, group, idx) -> StructuredTarget | None:
    if attn is None:
        return None
    # fused q/k/v (``fuse_qkv_projections``) runs ``to_qkv`` instead of the linears sliced here
    assert not getattr(attn, "fused_projections", False), f"{name}: unfuse the projections first"
    prod = [f"to_{p}" for p in "qkv"] + [f"add_{p}_proj" for p in "qkv"]
    producers = [(f"{name}.{p}", getattr(attn, p), False) for p in prod
                 if isinstance(getattr(attn, p, None), nn.Linear)]
    consumers = [(f"{name}.to_out.0", attn.to_out[0])]
    if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
        consumers.append((f"{name}.to_add_out", attn.to_add_out))
    head_dim = attn.to_q.out_features // attn.heads
    return StructuredTarget(name, "heads", group, idx, attn, consumers, producers, head_dim)


def ffn_target(name, ff, group, idx) -> StructuredTarget | None:
    if ff is None:
        return None
    up, down = ff.net[0].proj, ff.net[2]
    gated = up.out_features == 2 * down.in_features  # GEGLU: [hidden | gate] halves
    assert gated or up.out_features == down.in_features, f"{name}: unexpected FFN shapes"
    return StructuredTarget(
        name, "ffn", group, idx, ff, [(f"{name}.net.2", down)], [(f"{name}.net.0.proj", up, gated)], 1
    )


def group_columns(target: StructuredTarget, groups: list[int]) -> torch.Tensor:
    """Column indices of ``groups`` inside the target's own range (group-major)."""
    g = target.group_size
    idx = torch.as_tensor(groups, dtype=torch.long)
    return (idx[:, None] * g + torch.arange(g)).flatten()
