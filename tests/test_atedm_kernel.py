"""AT-EDM without a pipeline: G-WPR kernel properties (spec §4 item 7), mapped attention,
constructor errors, configs, and FLOPs on full-size architectures (spec §4 item 8, slow).
The wiring on every family is in test_atedm.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edm.errors import ConfigError, UnsupportedFamily
from edm.methods.base import ApplyContext
from edm.methods.token import atedm_kernel as K
from edm.methods.token.atedm import ATEDM
from edm.methods.token.attn_map import attention_with_map

NO_DSAP = {"enabled": False}


def row_stochastic(b, n, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return (sharp * torch.randn(b, n, n, generator=g)).softmax(-1)


# --------------------------------------------------------------------------- kernel (spec §4.7)


def test_gwpr_is_a_distribution_from_a_uniform_start():
    A = row_stochastic(3, 50)
    s0 = K.gwpr(A, iters=0)
    assert torch.allclose(s0, torch.full_like(s0, 1 / 50))
    for it in (1, 2, 5, 10):
        s = K.gwpr(A, iters=it)
        assert torch.allclose(s.sum(-1), torch.ones(3), atol=1e-5)
        assert (s >= 0).all()
    # s <- A^T s, written out
    s = torch.full((3, 50), 1 / 50)
    for _ in range(5):
        s = torch.einsum("bij,bi->bj", A, s)
    assert torch.allclose(K.gwpr(A, 5), s, atol=1e-6)


def test_gwpr_uniform_stays_uniform_and_heavy_column_ranks_first():
    A = torch.full((2, 16, 16), 1 / 16)
    assert torch.allclose(K.gwpr(A, 5), torch.full((2, 16), 1 / 16))
    logits = torch.randn(2, 16, 16)
    logits[:, :, 11] += 6.0  # every query attends heavily to key 11
    s = K.gwpr(logits.softmax(-1), 5)
    assert (s.argmax(-1) == 11).all()
    keep = K.keep_indices(s, 4)
    assert (keep == 11).any(-1).all()


def test_hits_cross_scores():
    Ac = (2 * torch.randn(2, 20, 7)).softmax(-1)
    s = K.hits_image_scores(Ac, 5)
    assert s.shape == (2, 20) and torch.allclose(s.sum(-1), torch.ones(2), atol=1e-5)
    # an image token that attends only to the text tokens everyone attends to ranks high
    Ac = torch.full((1, 6, 3), 1e-3)
    Ac[0, :, 0] = 1.0
    Ac[0, 4] = torch.tensor([1.0, 0.0, 0.0])
    Ac[0, 2] = torch.tensor([0.0, 0.0, 1.0])
    s = K.hits_image_scores(Ac / Ac.sum(-1, keepdim=True), 5)
    assert s[0, 4] > s[0, 2]


def test_keep_indices_sorted_topk_and_cfg_shared():
    s = torch.rand(4, 30)
    keep = K.keep_indices(s, 9)
    assert keep.shape == (4, 9) and (keep.diff(dim=-1) > 0).all()
    ref = s.topk(9, dim=-1).indices.sort(-1).values
    assert torch.equal(keep, ref)
    shared = K.keep_indices(s, 9, cfg_shared=True)
    assert torch.equal(shared[:2], shared[2:]) and torch.equal(shared[2:], ref[2:])
    assert K.keep_count(4096, 0.63) == 1516 and K.keep_count(10, 0.0) == 10
    assert K.keep_count(10, 0.99) == 1


@pytest.mark.parametrize("how", ["attention", "cosine"])
def test_assignment_and_refill_copy_property(how):
    b, n, c, k = 2, 24, 5, 7
    A = row_stochastic(b, n, seed=1)
    x = torch.randn(b, n, c)
    keep = K.keep_indices(K.gwpr(A), k)
    assign = K.assign_by_attention(A, keep) if how == "attention" else K.assign_by_cosine(x, keep)
    assert assign.shape == (b, n) and assign.min() >= 0 and assign.max() < k
    for bi in range(b):
        kept = keep[bi].tolist()
        for j in range(n):
            if j in kept:
                assert assign[bi, j] == kept.index(j)
            elif how == "attention":
                assert assign[bi, j] == A[bi, j, keep[bi]].argmax()
    x_kept = K.gather_tokens(x, keep)
    full = K.refill(x_kept, assign)
    assert full.shape == (b, n, c)
    assert torch.equal(K.gather_tokens(full, keep), x_kept)  # kept tokens unchanged
    for bi in range(b):  # every pruned token is an exact copy of some kept token
        for j in range(n):
            assert (full[bi, j] == x_kept[bi]).all(-1).any()


def test_two_pruning_points_compose():
    b, n, c = 2, 20, 3
    x = torch.randn(b, n, c)
    A1 = row_stochastic(b, n, seed=2)
    keep1 = K.keep_indices(K.gwpr(A1), 12)
    src = K.compose_sources(None, K.assign_by_attention(A1, keep1))
    x1 = K.gather_tokens(x, keep1)
    A2 = row_stochastic(b, 12, seed=3)
    keep2 = K.keep_indices(K.gwpr(A2), 5)
    a2 = K.assign_by_attention(A2, keep2)
    src = K.compose_sources(src, a2)
    x2 = K.gather_tokens(x1, keep2)
    full = K.refill(x2, src)
    # brute force: a grid token copies the stage-1 token it maps to, which copies its stage-2 token
    a1 = K.assign_by_attention(A1, keep1)
    for bi in range(b):
        for j in range(n):
            assert torch.equal(full[bi, j], x2[bi, a2[bi, a1[bi, j]]])


@pytest.mark.parametrize("chunk_mb", [1e-4, 0.01, 64.0])
def test_attention_with_map_matches_sdpa(chunk_mb):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g) for _ in range(3))
    out, A, s = attention_with_map(q, k, v, chunk_mb=chunk_mb)
    assert s is None
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    P = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    assert torch.allclose(A, P.mean(1), atol=1e-6)
    # MMDiT: the map covers the first 30 (image) tokens, rows renormalised
    out, A, _ = attention_with_map(q, k, v, n_map=30, chunk_mb=chunk_mb)
    Pi = P[:, :, :30, :30].mean(1)
    assert torch.allclose(A, Pi / Pi.sum(-1, keepdim=True), atol=1e-5)
    out, A, s = attention_with_map(q, k, v, head_reduce="rms", iters=3, chunk_mb=chunk_mb)
    assert torch.allclose(s, K.rms_over_heads(K.gwpr(P, 3)), atol=1e-6)


def test_kept_rows_output_matches_the_mapped_output():
    from edm.methods.token.attn_map import MapSlot, kept_rows_output

    class Attn:  # identity output projections
        to_out = (torch.nn.Identity(), torch.nn.Identity())

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g) for _ in range(3))
    out, A, _ = attention_with_map(q, k, v)
    none, A2, _ = attention_with_map(q, k, v, need_out=False)
    assert none is None and torch.equal(A, A2)
    keep = K.keep_indices(K.gwpr(A), 15)
    slot = MapSlot(pending=(Attn(), q, k, v))
    kept = kept_rows_output(slot, keep)
    ref = K.gather_tokens(out.transpose(1, 2).flatten(2), keep)
    assert kept.shape == (2, 15, 24) and torch.allclose(kept, ref, atol=1e-5)
    assert slot.pending is None


def test_kernels_run_on_meta():
    q = torch.empty(1, 2, 64, 8, device="meta")
    _out, A, _ = attention_with_map(q, q, q, chunk_mb=1e-3)
    keep = K.keep_indices(K.gwpr(A), 20)
    src = K.assign_by_attention(A, keep)
    full = K.refill(K.gather_tokens(torch.empty(1, 64, 8, device="meta"), keep), src)
    assert full.shape == (1, 64, 8) and full.device.type == "meta"


def test_errors():
    with pytest.raises(UnsupportedFamily):
        ATEDM().check("vqgan")
    with pytest.raises(UnsupportedFamily):
        ATEDM().apply(object(), ApplyContext(family="vqgan"))
    for kw in (
        {"prune_ratio": 1.0},
        {"selection": "topk"},
        {"prune_point": "x"},
        {"iters": 0},
        {"prune_after_layers": []},
        {"downsamples": [3]},
        {"score_source": "cross", "prune_point": "after_self_attn"},
        {"map_output": "kept_fused", "prune_point": "after_ffn"},
        {"map_output": "sometimes"},
        {"profile": "gpu"},
    ):
        with pytest.raises(ConfigError):
            ATEDM(**kw)


@pytest.mark.parametrize("name", ["at_edm", "at_edm_a", "at_edm_b", "at_edm_c", "at_edm_d"])
def test_configs_instantiate(compose_cfg, name):
    from hydra.utils import instantiate

    cfg = compose_cfg(f"method={name}")
    m = instantiate(cfg.method)
    assert isinstance(m, ATEDM) and m.dsap.enabled


# --------------------------------------------------------------------------- FLOPs (spec §4.8)


def test_meta_flops_drop_on_a_full_size_unet():
    """Kernel and wiring run on the meta device and FLOPs drop (SDXL architecture, 256²)."""
    from edm.eval.flops import meta_pipe, trajectory_flops

    pipe, inputs = meta_pipe("sdxl", 256, 256)
    dense = trajectory_flops(pipe, inputs, None)
    f63 = trajectory_flops(pipe, inputs, ATEDM(prune_ratio=0.63, dsap=NO_DSAP))
    assert f63 < 0.8 * dense


@pytest.mark.slow
def test_sdxl_budgets_match_the_paper():
    """Committed at_edm / at_edm_a..d within 3 % of the paper's TFLOPs/step (SD-XL, 1024²)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from atedm_budgets import PAPER_T, committed

    from edm.eval.flops import meta_pipe, trajectory_flops

    pipe, inputs = meta_pipe("sdxl")
    dense = trajectory_flops(pipe, inputs, None) / 1e12
    assert abs(dense / PAPER_T["dense"] - 1) < 0.03
    for name in ("at_edm", "at_edm_a", "at_edm_b", "at_edm_c", "at_edm_d"):
        f = trajectory_flops(pipe, inputs, committed(name)) / 1e12
        assert abs(f / PAPER_T[name] - 1) < 0.03, (name, f)
