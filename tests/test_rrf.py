"""Reciprocal rank fusion for MMDiT joint heads: the pick, ties included, equals the official
``Alrightlone/OBS-Diff`` ``lib/OBS_Diff_Structured.py`` (``reciprocal_rank_fusion`` and
``sorted(..., reverse=True)`` in ``OBS_Diff_Structured_Joint_Attn.struct_prune``)."""

from __future__ import annotations

import random

import pytest
import torch

from edm.methods.weight import structured as K


def _official_pick(rankings, k=60):
    """Line by line as the official code: a dict filled stream by stream, then a stable sort."""
    fused_scores = {}
    for rank_list in rankings:
        for rank, item in enumerate(rank_list):
            if item not in fused_scores:
                fused_scores[item] = 0
            fused_scores[item] += 1 / (k + rank + 1)
    sorted_heads = sorted(fused_scores.keys(), key=lambda h: fused_scores[h], reverse=True)
    return sorted_heads[0]


def test_rrf_tie_goes_to_the_image_streams_better_head():
    # heads 0 and 1 have ranks (1, 0) and (0, 1): equal fused scores
    rankings = [[1, 0, 2], [0, 1, 2]]
    fused = K.reciprocal_rank_fusion(rankings)
    assert fused[0] == fused[1]
    assert _official_pick(rankings) == 1
    assert K.rrf_pick(rankings) == 1
    assert K.rrf_pick([[0, 1, 2], [1, 0, 2]]) == 0


@pytest.mark.parametrize("n_heads,n_streams", [(2, 2), (3, 2), (5, 2), (24, 2), (6, 3), (4, 1)])
def test_rrf_pick_matches_official_on_random_rankings(n_heads, n_streams):
    rng = random.Random(n_heads * 10 + n_streams)
    ties = 0
    for _ in range(300):
        rankings = [rng.sample(range(n_heads), n_heads) for _ in range(n_streams)]
        k = rng.choice([0, 1, 60])
        assert K.rrf_pick(rankings, k) == _official_pick(rankings, k), rankings
        fused = K.reciprocal_rank_fusion(rankings, k)
        ties += sum(v == max(fused.values()) for v in fused.values()) > 1
    if n_streams == 2 and n_heads <= 5:
        assert ties > 0  # the cases that decide the tie rule did occur


def test_joint_heads_tie_prunes_the_image_streams_choice():
    """End to end: with H = I a head's Eq. 7 error is its squared norm, so the image stream ranks
    the heads [1, 0, 2] and the text stream [0, 1, 2]; the official code prunes head 1."""
    head_dim = 4
    W_img = torch.cat([torch.full((6, head_dim), v) for v in (2.0, 1.0, 3.0)], 1)
    W_txt = torch.cat([torch.full((5, head_dim), v) for v in (1.0, 2.0, 3.0)], 1)
    H = torch.eye(3 * head_dim)
    res = K.obs_prune_heads_joint([W_img, W_txt], [H, H.clone()], 1, head_dim=head_dim)
    assert res.pruned.tolist() == [1]
    for W in res.W:
        assert torch.all(W[:, head_dim : 2 * head_dim] == 0)
