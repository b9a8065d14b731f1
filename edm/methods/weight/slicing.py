"""Structured pruning wiring: which diffusers modules form a head / neuron, and physical slicing.

A *structured target* is one attention module (its heads) or one feed-forward network (its hidden
neurons). Pruning decisions and OBS compensation happen on the target's *consumers* -- the output
projections whose input columns are the heads / neurons (``to_out.0``, MMDiT's ``to_add_out``,
``ff.net.2``) -- and the *producers* are sliced to match:

* attention heads: rows of ``to_q/to_k/to_v`` (and MMDiT's ``add_q/k/v_proj``, the text stream of
  the joint attention), columns of the consumers, then ``attn.heads``; diffusers' processors derive
  ``head_dim = key.shape[-1] // attn.heads``, so the head dimension is unchanged.
* FFN neurons: rows of ``ff.net.0.proj`` -- both halves ``i`` and ``i + inner`` for GEGLU (UNets),
  one row for SD3's GELU -- and columns of ``ff.net.2``.

A masked target (consumer columns zeroed, producers intact) computes exactly what the sliced one
computes, which is what ``tests/test_structured.py`` checks. Slicing replaces parameters of the
existing ``nn.Linear`` objects, so hooks and references to the modules stay valid.

This module knows where the structures are and how to mask, slice and measure them; *which*
groups go is each method's ``choose`` (:class:`edm.methods.weight.base_structured.StructuredPruning`
runs the package loop around it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from edm.eval.flops import count_params
from edm.families import adapter

log = logging.getLogger(__name__)

Named = tuple[str, nn.Linear]


@dataclass(eq=False)  # identity semantics: targets are dict keys
class StructuredTarget:
    """One prunable structure (see the module docstring).

    Attributes:
        name: module path of the attention / feed-forward module in the denoiser.
        kind: ``heads`` or ``ffn``.
        group: target group it belongs to (``attn``, ``ff``, ``context``).
        layer_index: transformer layer index in forward order (for first/last exclusion).
        module: the ``Attention`` or ``FeedForward`` module.
        consumers: ``(name, linear)`` whose input columns are pruned; need input Hessians.
        producers: ``(name, linear, gated)`` whose output rows are sliced; ``gated`` = GEGLU.
        group_size: columns per group (head_dim, or 1 for neurons).
        pruned: pruned group indices, set by a method's ``choose`` (or :func:`mask_target`).
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

    @property
    def num_groups(self) -> int:
        return self.consumers[0][1].in_features // self.group_size

    def num_to_prune(self, sparsity: float) -> int:
        """round(groups * sparsity) as the reference code, keeping at least one group."""
        return max(0, min(round(self.num_groups * sparsity), self.num_groups - 1))


def _attn_target(name, attn, group, idx) -> StructuredTarget | None:
    if attn is None:
        return None
    prod = [f"to_{p}" for p in "qkv"] + [f"add_{p}_proj" for p in "qkv"]
    producers = [(f"{name}.{p}", getattr(attn, p), False) for p in prod
                 if isinstance(getattr(attn, p, None), nn.Linear)]
    consumers = [(f"{name}.to_out.0", attn.to_out[0])]
    if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
        consumers.append((f"{name}.to_add_out", attn.to_add_out))
    head_dim = attn.to_q.out_features // attn.heads
    return StructuredTarget(name, "heads", group, idx, attn, consumers, producers, head_dim)


def _ffn_target(name, ff, group, idx) -> StructuredTarget | None:
    if ff is None:
        return None
    up, down = ff.net[0].proj, ff.net[2]
    gated = up.out_features == 2 * down.in_features  # GEGLU: [hidden | gate] halves
    assert gated or up.out_features == down.in_features, f"{name}: unexpected FFN shapes"
    return StructuredTarget(
        name, "ffn", group, idx, ff, [(f"{name}.net.2", down)], [(f"{name}.net.0.proj", up, gated)], 1
    )


def resolve_exclude_first_last(exclude_first_last: bool | None, arch: str) -> bool:
    """``None`` = what the paper's tables do for this architecture.

    MMDiT: excluded (Tables 4 and 9 say "first and last transformer blocks were excluded").
    UNet: included -- Table 3 (SDXL, 30 %: 1.91 B params, 4.70 TFLOPs) is reproduced only with
    every block pruned (1.912 B / 4.693 T measured; excluding the first and last
    ``BasicTransformerBlock`` gives 1.918 B / 4.730 T), see experiments/results/bench_structured.md.
    """
    if exclude_first_last is None:
        return arch == "mmdit"
    return bool(exclude_first_last)


def structured_targets(
    denoiser: nn.Module,
    family: str,
    exclude_first_last: bool | None = None,
    groups=("attn", "ff", "context"),
) -> list[StructuredTarget]:
    """All structured targets of a denoiser, in forward order.

    Args:
        denoiser: ``pipe.unet`` or ``pipe.transformer``.
        family: model family (selects the adapter: UNet or MMDiT).
        exclude_first_last: skip the first and last transformer layers (forward order);
            ``None`` (default) follows the paper's tables: True for MMDiT, False for UNets (see
            :func:`resolve_exclude_first_last`). The public script only skips the last MMDiT
            block (``context_pre_only``); spec §2.4.
        groups: ``attn`` = attention heads (MMDiT joint attention prunes both streams' heads
            together, they share heads), ``ff`` = image FFN neurons, ``context`` = MMDiT text FFN.
    """
    ad = adapter(family)
    exclude_first_last = resolve_exclude_first_last(exclude_first_last, ad.arch)
    layers = [(n, m) for blk in ad.attention_blocks(denoiser) for n, m in blk.layers]  # forward order
    targets = []
    for idx, (name, layer) in enumerate(layers):
        if exclude_first_last and idx in (0, len(layers) - 1):
            log.info("structured: skipping layer %s <method.exclude_first_last=true>", name)
            continue
        cands = []
        if "attn" in groups:
            if ad.arch == "mmdit":
                cands += [_attn_target(f"{name}.attn", layer.attn, "attn", idx),
                          _attn_target(f"{name}.attn2", getattr(layer, "attn2", None), "attn", idx)]
            else:
                cands += [_attn_target(f"{name}.attn1", layer.attn1, "attn", idx),
                          _attn_target(f"{name}.attn2", getattr(layer, "attn2", None), "attn", idx)]
        if "ff" in groups:
            cands.append(_ffn_target(f"{name}.ff", layer.ff, "ff", idx))
        if "context" in groups and ad.arch == "mmdit":
            cands.append(_ffn_target(f"{name}.ff_context", layer.ff_context, "context", idx))
        targets += [t for t in cands if t is not None]
    return targets


def structured_units(targets: list[StructuredTarget]) -> list[list[Named]]:
    """Consumer layers as ordered basic units (only they need Hessians), for module packages.

    The image and text FFNs of one MMDiT block read independent inputs, so they share a unit,
    like OBS-Diff's ``{ff.net.2, ff_context.net.2}`` rule; every other target is its own unit.
    """
    units: list[list[Named]] = []
    last_ffn_layer = None
    for t in targets:
        if t.kind == "ffn" and t.group == "context" and last_ffn_layer == t.layer_index:
            units[-1] = units[-1] + list(t.consumers)
            continue
        units.append(list(t.consumers))
        last_ffn_layer = t.layer_index if t.kind == "ffn" else None
    return units


def _columns(target: StructuredTarget, groups: list[int]) -> torch.Tensor:
    g = target.group_size
    idx = torch.as_tensor(groups, dtype=torch.long)
    return (idx[:, None] * g + torch.arange(g)).flatten()


def mask_target(target: StructuredTarget, pruned: list[int]) -> None:
    """Zero the consumers' columns of ``pruned`` groups without compensation (L1, tests)."""
    cols = _columns(target, pruned)
    with torch.no_grad():
        for _, lin in target.consumers:
            lin.weight[:, cols.to(lin.weight.device)] = 0
    target.pruned = sorted(int(p) for p in pruned)


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    with torch.no_grad():
        W = lin.weight
        if rows is not None:
            W = W[rows.to(W.device)]
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias[rows.to(W.device)].clone(),
                                        requires_grad=lin.bias.requires_grad)
            lin.out_features = W.shape[0]
        if cols is not None:
            W = W[:, cols.to(W.device)]
            lin.in_features = W.shape[1]
        lin.weight = nn.Parameter(W.clone(), requires_grad=lin.weight.requires_grad)


def slice_target(target: StructuredTarget) -> None:
    """Physically remove ``target.pruned`` groups from producers, consumers and attributes."""
    if not target.pruned:
        return
    n = target.num_groups
    keep = [i for i in range(n) if i not in set(target.pruned)]
    cols = _columns(target, keep)
    for _, lin in target.consumers:
        _slice_linear(lin, None, cols)
    for _, lin, gated in target.producers:
        rows = torch.cat([cols, cols + n]) if gated else cols  # GEGLU: both halves
        _slice_linear(lin, rows, None)
    if target.kind == "heads":
        attn = target.module
        attn.heads = len(keep)
        attn.inner_dim = cols.numel()
        if hasattr(attn, "inner_kv_dim"):
            attn.inner_kv_dim = cols.numel()
        if hasattr(attn, "sliceable_head_dim"):
            attn.sliceable_head_dim = len(keep)
    target.info["kept"] = len(keep)
    target.pruned = []  # sliced: indices no longer refer to the module


def slice_targets(targets: list[StructuredTarget]) -> dict:
    """Slice every pruned target; returns ``{target name: groups kept}``."""
    out = {}
    for t in targets:
        before = t.num_groups
        slice_target(t)
        out[t.name] = {"before": before, "after": t.num_groups}
    return out


def target_weight_count(targets: list[StructuredTarget]) -> int:
    """Weights of the producers and consumers of ``targets`` (the targeted layers)."""
    return sum(lin.weight.numel() for t in targets for lin in
               [m for _, m in t.consumers] + [m for _, m, _ in t.producers])


def finish(denoiser, targets, results, params_before, weights_before, do_slice=True) -> dict:
    """Slice (optionally) and measure: ``sparsity`` = fraction of the targeted layers' weights
    removed (zeroed columns count when not sliced), ``patched`` = targets that lost a group."""
    if do_slice:
        slice_targets(targets)
        removed = weights_before - target_weight_count(targets)
    else:
        removed = sum(int((lin.weight == 0).sum()) for t in targets for _, lin in t.consumers)
    return {
        "targets": results,
        "kept": {t.name: t.num_groups - len(t.pruned or []) for t in targets},
        "patched": sum(1 for r in results if r["pruned"] > 0),
        "num_targets": len(targets),
        "sparsity": removed / max(weights_before, 1),
        "params_before": params_before,
        "params_after": count_params(denoiser),
        "sliced": bool(do_slice),
    }
