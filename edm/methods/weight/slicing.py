"""Structured pruning wiring: which diffusers modules form a head / neuron, and physical slicing.

A *structured target* is one attention module (its heads) or one feed-forward network (its hidden
neurons). Pruning decisions and OBS compensation happen on the target's *consumers* -- the output
projections whose input columns are the heads / neurons (``to_out.0``, MMDiT's ``to_add_out``,
``ff.net.2``) -- and the *producers* are sliced to match:

* attention heads: rows of ``to_q/to_k/to_v`` (and MMDiT's ``add_q/k/v_proj``, the text stream of
  the joint attention), columns of the consumers, then ``attn.heads``; diffusers' processors derive
  ``head_dim = key.shape[-1] // attn.heads``, so the head dimension is unchanged.
* FFN neurons: rows of ``ff.net.0.proj`` -- both halves ``i`` and ``i + inner`` for GEGLU (UNets),
  one row for SD3's and FLUX's GELU -- and columns of ``ff.net.2``.

Architectures: UNets (``BasicTransformerBlock``: ``attn1``, ``attn2``, ``ff``), MMDiT
(``JointTransformerBlock``: joint ``attn`` of both streams, ``attn2``, ``ff``, ``ff_context``) and
FLUX.1 (:mod:`edm.methods.weight.slicing_flux`): double-stream blocks are MMDiT joint blocks;
single-stream blocks have no attention output projection -- ``proj_out`` reads
``cat([attention heads, MLP neurons])`` -- so their head target and their MLP target share that
consumer, each owning a column range of it (``col_offset``, ``num_cols``).

A masked target (consumer columns zeroed, producers intact) computes exactly what the sliced one
computes, which is what ``tests/test_structured.py`` and ``tests/test_flux_structured.py``
check. Slicing replaces parameters of the existing ``nn.Linear`` objects, so hooks and
references to the modules stay valid.

This module knows where the structures are and how to mask, slice and measure them; *which*
groups go is each method's ``choose`` (:class:`edm.methods.weight.base_structured.StructuredPruning`
runs the package loop around it).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from edm.eval.flops import count_params
from edm.families import adapter
from edm.methods.weight.slicing_flux import flux_layer_targets
from edm.methods.weight.targets import (
    Named,
    StructuredTarget,
    attn_target,
    ffn_target,
    group_columns,
)

log = logging.getLogger(__name__)

def resolve_exclude_first_last(exclude_first_last: bool | None, arch: str) -> bool:
    """``None`` = what the paper's tables do for this architecture.

    MMDiT: excluded (Tables 4 and 9 say "first and last transformer blocks were excluded").
    FLUX.1: excluded, as MMDiT: the paper has no FLUX table, and FLUX is an MMDiT-style
    transformer (its double-stream blocks are MMDiT blocks), so the rule of its transformer
    tables applies; first and last are over the forward order of all blocks, i.e. double-stream
    block 0 and the last single-stream block (the one that feeds ``norm_out``).
    UNet: included -- Table 3 (SDXL, 30 %: 1.91 B params, 4.70 TFLOPs) is reproduced only with
    every block pruned (1.912 B / 4.693 T measured; excluding the first and last
    ``BasicTransformerBlock`` gives 1.918 B / 4.730 T), see experiments/results/bench_structured.md.
    """
    if exclude_first_last is None:
        return arch in ("mmdit", "flux")
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
        family: model family (selects the adapter: UNet, MMDiT or FLUX).
        exclude_first_last: skip the first and last transformer layers (forward order; FLUX:
            double-stream then single-stream blocks); ``None`` (default) follows the paper's
            tables: True for MMDiT and FLUX, False for UNets (see
            :func:`resolve_exclude_first_last`). The public script only skips the last MMDiT
            block (``context_pre_only``); spec §2.4.
        groups: ``attn`` = attention heads (MMDiT / FLUX double-stream joint attention prunes
            both streams' heads together, they share heads; FLUX single-stream heads),
            ``ff`` = image FFN neurons (FLUX single-stream: MLP neurons), ``context`` = the text
            FFN of MMDiT / FLUX double-stream blocks.
    """
    ad = adapter(family)
    exclude_first_last = resolve_exclude_first_last(exclude_first_last, ad.arch)
    layers = [(blk.stage, n, m) for blk in ad.attention_blocks(denoiser) for n, m in blk.layers]
    targets = []
    for idx, (stage, name, layer) in enumerate(layers):  # forward order
        if exclude_first_last and idx in (0, len(layers) - 1):
            log.info("structured: skipping layer %s <method.exclude_first_last=true>", name)
            continue
        if ad.arch == "flux":
            targets += flux_layer_targets(name, layer, stage, groups, idx)
            continue
        cands = []
        if "attn" in groups:
            if ad.arch == "mmdit":
                cands += [attn_target(f"{name}.attn", layer.attn, "attn", idx),
                          attn_target(f"{name}.attn2", getattr(layer, "attn2", None), "attn", idx)]
            else:
                cands += [attn_target(f"{name}.attn1", layer.attn1, "attn", idx),
                          attn_target(f"{name}.attn2", getattr(layer, "attn2", None), "attn", idx)]
        if "ff" in groups:
            cands.append(ffn_target(f"{name}.ff", layer.ff, "ff", idx))
        if "context" in groups and ad.arch == "mmdit":
            cands.append(ffn_target(f"{name}.ff_context", layer.ff_context, "context", idx))
        targets += [t for t in cands if t is not None]
    return targets


def structured_units(targets: list[StructuredTarget]) -> list[list[Named]]:
    """Consumer layers as ordered basic units (only they need Hessians), for module packages.

    The image and text FFNs of one MMDiT block read independent inputs, so they share a unit,
    like OBS-Diff's ``{ff.net.2, ff_context.net.2}`` rule; the head and MLP targets of a FLUX
    single-stream block have one consumer (``proj_out``), listed once; every other target is
    its own unit.
    """
    units: list[list[Named]] = []
    last_ffn_layer = None
    for t in targets:
        if t.kind == "ffn" and t.group == "context" and last_ffn_layer == t.layer_index:
            units[-1] = units[-1] + list(t.consumers)
            continue
        if units and [n for n, _ in t.consumers] == [n for n, _ in units[-1]]:
            continue  # a sibling's consumer, already a unit
        units.append(list(t.consumers))
        last_ffn_layer = t.layer_index if t.kind == "ffn" else None
    return units


def mask_target(target: StructuredTarget, pruned: list[int]) -> None:
    """Zero the consumers' columns of ``pruned`` groups without compensation (L1, tests)."""
    cols = target.columns(pruned)
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
    """Physically remove ``target.pruned`` groups (see :func:`slice_targets`)."""
    slice_targets([target])


def slice_targets(targets: list[StructuredTarget]) -> dict:
    """Physically remove every target's ``pruned`` groups from producers, consumers and
    attributes; returns ``{target name: {"before", "after"}}`` groups.

    A consumer shared by sibling targets (FLUX single-stream ``proj_out``) is sliced once, for
    all of its owners' pruned columns; the owners' ``col_offset`` then moves down by the number
    of columns removed before it.
    """
    out = {t.name: {"before": t.num_groups} for t in targets}
    todo = [t for t in targets if t.pruned]
    groups_before = {id(t): t.num_groups for t in todo}  # read before the consumers shrink
    dropped: dict[int, tuple[nn.Linear, list[torch.Tensor]]] = {}  # consumer -> its pruned columns
    for t in todo:
        for _, lin in t.consumers:
            dropped.setdefault(id(lin), (lin, []))[1].append(t.columns(t.pruned))
    gone = {k: torch.cat(c) for k, (_, c) in dropped.items()}
    # every owner of a sliced consumer, sliced target or not, gets its new offset
    owners = {id(o): o for t in todo for o in [t, *t.siblings]}
    for o in owners.values():
        cols = gone.get(id(o.consumers[0][1]))
        if cols is not None:
            o.col_offset -= int((cols < o.col_offset).sum())
    for k, (lin, _) in dropped.items():
        keep = torch.ones(lin.in_features, dtype=torch.bool)
        keep[gone[k]] = False
        _slice_linear(lin, None, torch.nonzero(keep).flatten())
    for t in todo:
        n = groups_before[id(t)]
        kept = [i for i in range(n) if i not in set(t.pruned)]
        rows = group_columns(t, kept)  # producer rows: the target's own channels, no offset
        for _, lin, gated in t.producers:
            _slice_linear(lin, torch.cat([rows, rows + n]) if gated else rows, None)  # GEGLU
        if t.num_cols is not None:
            t.num_cols = rows.numel()
        if t.kind == "heads":
            attn = t.module
            attn.heads = len(kept)
            attn.inner_dim = rows.numel()
            if hasattr(attn, "inner_kv_dim"):
                attn.inner_kv_dim = rows.numel()
            if hasattr(attn, "sliceable_head_dim"):
                attn.sliceable_head_dim = len(kept)
        t.info["kept"] = len(kept)
        t.pruned = []  # sliced: indices no longer refer to the module
    for t in todo:
        if t.resync is not None:
            t.resync()
    for t in targets:
        out[t.name]["after"] = t.num_groups
    return out


def _targeted_linears(targets: list[StructuredTarget]) -> list[nn.Linear]:
    """Producers and consumers of ``targets``, each once (sibling targets share consumers)."""
    lins = {}
    for t in targets:
        for lin in [c for _, c in t.consumers] + [p for _, p, _ in t.producers]:
            lins[id(lin)] = lin
    return list(lins.values())


def target_weight_count(targets: list[StructuredTarget]) -> int:
    """Weights of the producers and consumers of ``targets`` (the targeted layers)."""
    return sum(lin.weight.numel() for lin in _targeted_linears(targets))


def finish(denoiser, targets, results, params_before, weights_before, do_slice=True) -> dict:
    """Slice (optionally) and measure: ``sparsity`` = fraction of the targeted layers' weights
    removed (zeroed columns count when not sliced), ``patched`` = targets that lost a group."""
    if do_slice:
        slice_targets(targets)
        removed = weights_before - target_weight_count(targets)
    else:
        consumers = {id(lin): lin for t in targets for _, lin in t.consumers}.values()
        removed = sum(int((lin.weight == 0).sum()) for lin in consumers)
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
