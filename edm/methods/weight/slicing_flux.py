"""Structured targets of FLUX.1 blocks (``FluxTransformer2DModel``), for :mod:`.slicing`.

* Double-stream ``FluxTransformerBlock``: an MMDiT joint block. ``attn`` heads are pruned in both
  streams at once (producers ``to_q/k/v`` and ``add_q/k/v_proj``, consumers ``to_out.0`` and
  ``to_add_out``, ranked jointly with RRF by structured OBS); ``ff`` and ``ff_context`` are
  GELU(tanh) ``FeedForward``\\ s (one producer row per neuron, ``net.0.proj`` -> ``net.2``).
* Single-stream ``FluxSingleTransformerBlock``: attention and MLP run in parallel on one
  normalised input and ``proj_out`` reads ``cat([attn_output, gelu(proj_mlp(x))])``. A head owns
  rows ``[h*d, (h+1)*d)`` of ``to_q/k/v`` and the same columns of ``proj_out``; MLP neuron ``i``
  owns row ``i`` of ``proj_mlp`` and column ``inner_dim + i`` of ``proj_out``. The two targets
  share ``proj_out`` (``col_offset`` 0 and ``inner_dim``; siblings of each other). The q/k
  RMSNorms act per ``head_dim`` and FLUX's processor reshapes by ``attn.head_dim``, so removing
  whole heads keeps them valid; rotary embeddings are per head too.

Target groups: single-stream heads count as ``attn`` and single-stream MLP neurons as ``ff`` (the
MLP is the block's feed-forward part); ``context`` exists only in double-stream blocks.
"""

from __future__ import annotations

from torch import nn

from edm.methods.weight.targets import StructuredTarget, attn_target, ffn_target


def flux_layer_targets(name: str, block: nn.Module, stage: str, groups, idx: int
                       ) -> list[StructuredTarget]:
    """Targets of one FLUX block (``stage`` = ``double`` or ``single``, from the adapter)."""
    if stage == "double":
        cands = []
        if "attn" in groups:
            cands.append(attn_target(f"{name}.attn", block.attn, "attn", idx))
        if "ff" in groups:
            cands.append(ffn_target(f"{name}.ff", block.ff, "ff", idx))
        if "context" in groups:
            cands.append(ffn_target(f"{name}.ff_context", block.ff_context, "context", idx))
        return [t for t in cands if t is not None]
    assert stage == "single", f"{name}: unknown FLUX stage {stage!r}"
    return _single_targets(name, block, groups, idx)


def _single_targets(name, block, groups, idx) -> list[StructuredTarget]:
    attn, out, mlp = block.attn, block.proj_out, block.proj_mlp
    assert not getattr(attn, "fused_projections", False), f"{name}: unfuse the projections first"
    inner = attn.to_q.out_features  # heads * head_dim
    assert out.in_features == inner + mlp.out_features, f"{name}: unexpected proj_out shape"
    consumer = (f"{name}.proj_out", out)
    targets = []
    if "attn" in groups:
        producers = [(f"{name}.attn.to_{p}", getattr(attn, f"to_{p}"), False) for p in "qkv"]
        targets.append(StructuredTarget(
            f"{name}.attn", "heads", "attn", idx, attn, [consumer], producers,
            group_size=inner // attn.heads, col_offset=0, num_cols=inner))
    if "ff" in groups:
        targets.append(StructuredTarget(
            f"{name}.proj_mlp", "ffn", "ff", idx, block, [consumer],
            [(f"{name}.proj_mlp", mlp, False)], group_size=1, col_offset=inner,
            num_cols=mlp.out_features))
    for t in targets:
        t.siblings = [s for s in targets if s is not t]
        t.resync = lambda block=block: _resync_single(block)
    return targets


def _resync_single(block: nn.Module) -> None:
    """Shape attributes the forward does not read, kept true after slicing: the MLP width, the
    pre-only attention's output width (it has no ``to_out``: its output is ``inner_dim``) and
    the tensor-parallel split of ``proj_out``'s input (diffusers' ``PackedRowwiseParallel``
    shards ``[attention | MLP]`` columns by these sizes; stale ones would split wrongly)."""
    block.mlp_hidden_dim = block.proj_mlp.out_features
    block.attn.out_dim = block.attn.inner_dim
    if hasattr(block.proj_out, "_tp_packed_row_blocks"):
        block.proj_out._tp_packed_row_blocks = [block.attn.inner_dim, block.mlp_hidden_dim]
