"""ImageReward, offline: modules built on current libraries load a tiny random checkpoint written
in the official key layout into a temporary Hugging Face cache (``hf_cache`` in conftest).
Faithfulness to the upstream package at full size is checked by
experiments/image_reward_parity/run_parity.sh (not in CI)."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch
from helpers import write_images

from edm.data.images import PromptItem
from edm.errors import MissingWeightsError


# --------------------------------------------------------------------------------- ImageReward
def official_layout(W, depth, patch, grid, H, layers, ffn, vocab, max_pos, head):
    """Key -> shape of upstream's ``ImageReward`` state dict (BLIP_Pretrain + MLP), listed from
    the upstream module structure independently of edm's implementation."""
    k = {
        "blip.visual_encoder.cls_token": (1, 1, W),
        "blip.visual_encoder.pos_embed": (1, grid**2 + 1, W),
        "blip.visual_encoder.patch_embed.proj.weight": (W, 3, patch, patch),
        "blip.visual_encoder.patch_embed.proj.bias": (W,),
        "blip.visual_encoder.norm.weight": (W,),
        "blip.visual_encoder.norm.bias": (W,),
    }
    for i in range(depth):
        b = f"blip.visual_encoder.blocks.{i}."
        k.update(
            {
                b + "norm1.weight": (W,),
                b + "norm1.bias": (W,),
                b + "attn.qkv.weight": (3 * W, W),
                b + "attn.qkv.bias": (3 * W,),
                b + "attn.proj.weight": (W, W),
                b + "attn.proj.bias": (W,),
                b + "norm2.weight": (W,),
                b + "norm2.bias": (W,),
                b + "mlp.fc1.weight": (4 * W, W),
                b + "mlp.fc1.bias": (4 * W,),
                b + "mlp.fc2.weight": (W, 4 * W),
                b + "mlp.fc2.bias": (W,),
            }
        )
    t = "blip.text_encoder."
    k.update(
        {
            t + "embeddings.position_ids": (1, max_pos),
            t + "embeddings.word_embeddings.weight": (vocab, H),
            t + "embeddings.position_embeddings.weight": (max_pos, H),
            t + "embeddings.LayerNorm.weight": (H,),
            t + "embeddings.LayerNorm.bias": (H,),
        }
    )
    for j in range(layers):
        L = f"{t}encoder.layer.{j}."
        for att, kv in (("attention", H), ("crossattention", W)):
            k.update(
                {
                    f"{L}{att}.self.query.weight": (H, H),
                    f"{L}{att}.self.query.bias": (H,),
                    f"{L}{att}.self.key.weight": (H, kv),
                    f"{L}{att}.self.key.bias": (H,),
                    f"{L}{att}.self.value.weight": (H, kv),
                    f"{L}{att}.self.value.bias": (H,),
                    f"{L}{att}.output.dense.weight": (H, H),
                    f"{L}{att}.output.dense.bias": (H,),
                    f"{L}{att}.output.LayerNorm.weight": (H,),
                    f"{L}{att}.output.LayerNorm.bias": (H,),
                }
            )
        k.update(
            {
                L + "intermediate.dense.weight": (ffn, H),
                L + "intermediate.dense.bias": (ffn,),
                L + "output.dense.weight": (H, ffn),
                L + "output.dense.bias": (H,),
                L + "output.LayerNorm.weight": (H,),
                L + "output.LayerNorm.bias": (H,),
            }
        )
    k.update(
        {
            "blip.vision_proj.weight": (256, W),
            "blip.vision_proj.bias": (256,),
            "blip.text_proj.weight": (256, H),
            "blip.text_proj.bias": (256,),
        }
    )
    for idx, (a, b) in zip((0, 2, 4, 6, 7), itertools.pairwise(head)):
        k.update({f"mlp.layers.{idx}.weight": (b, a), f"mlp.layers.{idx}.bias": (b,)})
    return k


def test_official_layout_listing_has_the_released_key_count():
    # 625 keys: the count upstream's module produces at full size (parity_output.log).
    full = official_layout(
        1024, 24, 16, 14, 768, 12, 3072, 30524, 512, [768, 1024, 128, 64, 16, 1]
    )
    assert len(full) == 625


TINY = {
    "W": 64,
    "depth": 2,
    "patch": 8,
    "grid": 4,
    "H": 32,
    "layers": 2,
    "ffn": 64,
    "max_pos": 40,
    "head": [32, 24, 16, 8, 4, 1],
}
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"abcdefghijklmnopqrstuvwxyz.,",
    *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"],
    "cat",
    "dog",
    "red",
    "on",
    "the",
]


@pytest.fixture
def tiny_ir_cache(hf_cache):
    """A random tiny checkpoint in the official layout + med_config + vocab in the hub cache."""
    vocab_size = len(VOCAB) + 2  # + [DEC], [ENC]
    shapes = official_layout(vocab=vocab_size, **TINY)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[1])[None]
        elif "norm" in key.lower() and key.endswith("weight"):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.2 * torch.randn(shape, generator=g)
    buf = __import__("io").BytesIO()
    torch.save(sd, buf)
    hf_cache("THUDM/ImageReward", "ImageReward.pt", buf.getvalue())
    med = {
        "hidden_act": "gelu",
        "hidden_size": TINY["H"],
        "intermediate_size": TINY["ffn"],
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": TINY["max_pos"],
        "num_attention_heads": 2,
        "num_hidden_layers": TINY["layers"],
        "pad_token_id": 0,
        "vocab_size": vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
    }
    hf_cache("THUDM/ImageReward", "med_config.json", json.dumps(med).encode())
    hf_cache("bert-base-uncased", "vocab.txt", ("\n".join(VOCAB) + "\n").encode())
    return sd


def test_image_reward_forward_on_tiny_official_layout_checkpoint(tmp_path, tiny_ir_cache):
    from edm.eval.image_reward import ImageReward

    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(32, 32), (48, 40), (20, 64)]
    ]
    images = write_images(tmp_path / "img", arrays)
    images.items = [
        PromptItem(0, "a red cat"),
        PromptItem(1, "the dog on the mat."),
        PromptItem(2, ""),
    ]
    ev = ImageReward(device="cpu", batch_size=2, vit_heads=2)
    ev.check()
    res = ev.evaluate(images)
    per = res["image_reward_per_image"]
    assert len(per) == 3 and all(np.isfinite(per)) and len(set(per)) == 3
    assert res["image_reward"] == pytest.approx(np.mean(per))
    # Batching must not change a score (one image at a time is what upstream's score() does).
    scorer = ev.scorer()
    single = [scorer.score([p], [q])[0] for p, q in zip(images.prompts, images.paths)]
    np.testing.assert_allclose(single, per, atol=1e-5)
    # The prompt matters (cross-attention path is live), and so does the image.
    assert scorer.score(["a dog"], [images.paths[0]])[0] != pytest.approx(per[0], abs=1e-6)
    assert scorer.score([images.prompts[0]], [images.paths[1]])[0] != pytest.approx(
        per[0], abs=1e-6
    )


def test_image_reward_modules_use_exactly_the_official_key_names(tiny_ir_cache):
    from edm.eval.image_reward_model import ImageRewardModel

    med = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 40,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": len(VOCAB) + 2,
    }
    model = ImageRewardModel.from_state_dict(tiny_ir_cache, med, vit_heads=2)
    unused = {k for k in tiny_ir_cache if "position_ids" in k or "_proj." in k}
    assert set(model.state_dict()) == set(tiny_ir_cache) - unused
    broken = {k: v for k, v in tiny_ir_cache.items() if "crossattention.self.key.weight" not in k}
    with pytest.raises(KeyError, match="lacks 2 keys"):
        ImageRewardModel.from_state_dict(broken, med, vit_heads=2)


def test_image_reward_preflight_names_the_missing_file(hf_cache, tmp_path):
    from edm.eval.image_reward import ImageReward

    t0 = time.time()
    with pytest.raises(MissingWeightsError) as err:
        ImageReward().check()
    assert time.time() - t0 < 2
    assert "hf download THUDM/ImageReward ImageReward.pt med_config.json" in str(err.value)
    hf_cache("THUDM/ImageReward", "ImageReward.pt", b"x")
    hf_cache("THUDM/ImageReward", "med_config.json", b"{}")
    with pytest.raises(MissingWeightsError, match="hf download bert-base-uncased vocab.txt"):
        ImageReward().check()
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "nope.pt")):
        ImageReward(checkpoint=str(tmp_path / "nope.pt")).check()
