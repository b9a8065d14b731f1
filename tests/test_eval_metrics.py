"""FID, CLIP score and ImageReward evaluators, offline, with tiny injected models/checkpoints.

Real weights are never needed: FID takes an injected feature model, CLIP score an open_clip-like
loader, and ImageReward a tiny random checkpoint written in the official key layout into a
temporary Hugging Face cache. Faithfulness of ImageReward to the upstream package at full size is
checked by experiments/image_reward_parity/run_parity.sh (not in CI).
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edm.errors import ConfigError, MissingWeightsError
from edm.eval.base import ImageSet, PromptItem, image_path

SNAP = "0" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty hub cache that edm's resolvers read; returns ``put(repo, name, bytes)``."""
    import huggingface_hub.constants as c

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))

    def put(repo: str, name: str, data: bytes):
        d = root / ("models--" + repo.replace("/", "--"))
        (d / "refs").mkdir(parents=True, exist_ok=True)
        (d / "refs" / "main").write_text(SNAP)
        p = d / "snapshots" / SNAP / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return p

    return put


def write_images(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(image_path(folder, i))
    return ImageSet(folder, [PromptItem(i, f"prompt {i}") for i in range(len(arrays))])


# ---------------------------------------------------------------------------------------- FID
def test_frechet_distance_equals_clean_fid():
    """Our formula (no scipy ``disp`` argument) gives clean-fid's value, singular case too."""
    cleanfid = pytest.importorskip("cleanfid.fid")
    from edm.eval.frechet import frechet_distance

    rng = np.random.default_rng(0)
    for n, d in ((500, 16), (8, 16)):  # (8, 16): rank-deficient covariances
        a, b = rng.normal(size=(n, d)), rng.normal(0.3, 1.2, size=(n, d))
        args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance(*args) == pytest.approx(cleanfid.frechet_distance(*args), rel=1e-6)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    from edm.eval.fid import frechet_distance

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        expected, rel=1e-9
    )
    assert abs(frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1))) < 1e-9


def test_running_moments_equal_numpy_over_uneven_batches():
    from edm.eval.fid import RunningMoments

    x = np.random.default_rng(1).normal(3.0, 2.0, size=(103, 6))
    acc = RunningMoments()
    for s, e in [(0, 1), (1, 40), (40, 41), (41, 103)]:
        acc.update(x[s:e])
    assert acc.n == 103
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.cov, np.cov(x, rowvar=False), rtol=1e-10)


class TinyFeatures(nn.Module):
    """Fixed random 8-d features of a float [B, 3, 32, 32] image in [0, 255]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.1)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)

    def forward(self, x):
        return torch.tanh(self.conv(x / 255.0)).mean((2, 3)) + self.conv(x / 255.0).std((2, 3))


def _textures(n, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 200, size=(n, 32, 32, 3))
    return np.clip(base + shift, 0, 255).astype(np.uint8)


def _fid(tmp_path, **kw):
    from edm.eval.fid import FID

    return FID(
        reference="toy_val32",
        cache_dir=str(tmp_path / "refs"),
        feature_model=TinyFeatures(),
        feature_name="tiny",
        feature_size=32,
        batch_size=8,
        device="cpu",
        **kw,
    )


def test_fid_identical_sets_zero_shifted_sets_positive_and_monotone(tmp_path):
    real = _textures(40, seed=0)
    ref_dir = tmp_path / "real"
    ref_dir.mkdir()
    for i, a in enumerate(real):
        Image.fromarray(a).save(ref_dir / f"r{i}.png")
    fid = _fid(tmp_path)
    with pytest.raises(MissingWeightsError):
        fid.check()
    path = fid.build_reference(ref_dir)
    assert path.name == "toy_val32_clean_tiny.npz" and path.is_file()
    fid.check()  # now passes
    mtime = path.stat().st_mtime_ns
    assert fid.build_reference(ref_dir) == path and path.stat().st_mtime_ns == mtime  # cached

    same = fid.evaluate(write_images(tmp_path / "same", list(real)))
    assert abs(same["fid"]) < 1e-6
    assert same["fid_images"] == 40 and same["fid_ref_images"] == 40
    small = fid.evaluate(write_images(tmp_path / "s20", list(_textures(40, 0, shift=20))))["fid"]
    large = fid.evaluate(write_images(tmp_path / "s60", list(_textures(40, 0, shift=60))))["fid"]
    assert 0 < small < large
    assert fid.meta["mode"] == "clean"


def test_fid_refuses_incomplete_shards_and_bad_config(tmp_path):
    from edm.eval.fid import FID

    images = write_images(tmp_path / "gen", list(_textures(3, 0)))
    images.items.append(PromptItem(3, "not generated yet"))
    with pytest.raises(FileNotFoundError, match="1 of 4 images missing"):
        _fid(tmp_path).evaluate(images)
    with pytest.raises(ConfigError, match="eval.fid.mode"):
        FID(mode="legacy_pytorch")
    with pytest.raises(ConfigError, match="eval.fid.reference"):
        FID(reference="coco 2014")


def test_fid_preflight_names_missing_files_fast(tmp_path):
    from edm.eval.fid import FID, INCEPTION_URL

    fid = FID(
        cache_dir=str(tmp_path / "refs"),
        inception_path=str(tmp_path / "w" / "inception-2015-12-05.pt"),
    )
    t0 = time.time()
    with pytest.raises(MissingWeightsError) as err:
        fid.check()
    assert time.time() - t0 < 2
    assert INCEPTION_URL in str(err.value) and "inception-2015-12-05.pt" in str(err.value)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "inception-2015-12-05.pt").write_bytes(b"x")
    with pytest.raises(MissingWeightsError) as err:
        fid.check()
    msg = str(err.value)
    assert (
        "coco2014_val512_clean.npz" in msg and "python -m edm.eval.precompute data=coco2014" in msg
    )


# ---------------------------------------------------------------------------------- CLIP score
COLORS = {"red": 0, "green": 1, "blue": 2}


class TinyClip(nn.Module):
    """open_clip-like: the image embedding is its mean RGB; a text embeds as its colour axis
    (``anti-<colour>`` as the negative axis)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode_image(self, pix):
        return pix.mean((2, 3)) + self.dummy

    def encode_text(self, tokens):
        return tokens


def tiny_clip_loader():
    from torchvision.transforms import Compose, Resize, ToTensor

    def tokenize(texts):
        out = torch.zeros(len(texts), 3)
        for i, t in enumerate(texts):
            sign = -1.0 if t.startswith("anti-") else 1.0
            out[i, COLORS[t.removeprefix("anti-")]] = sign
        return out

    return TinyClip(), Compose([Resize(8), ToTensor()]), tokenize


def test_clip_score_is_monotone_in_alignment_and_clamped(tmp_path):
    from edm.eval.clip_score import CLIPScore

    alphas = [0.2, 0.4, 0.6, 0.8, 1.0]
    arrays = []
    for a in alphas:  # the red share of the colour grows with alpha
        rgb = np.array([a, (1 - a) / 2, (1 - a) / 2]) * 255
        arrays.append(np.broadcast_to(rgb, (16, 16, 3)).astype(np.uint8).copy())
    images = write_images(tmp_path / "img", arrays)
    images.items = [PromptItem(i, "red") for i in range(len(alphas))]
    ev = CLIPScore(loader=tiny_clip_loader, batch_size=2, device="cpu")
    ev.check()  # an injected loader needs no weights
    res = ev.evaluate(images)
    per = res["clip_score_per_image"]
    assert all(b > a for a, b in itertools.pairwise(per))
    assert per[-1] == pytest.approx(1.0, abs=1e-2)  # pure red vs "red": cos = 1 (x1 scale)
    assert res["clip_score"] == pytest.approx(np.mean(per))
    images.items = [PromptItem(i, "anti-red") for i in range(len(alphas))]
    assert ev.evaluate(images)["clip_score_per_image"] == [0.0] * len(alphas)  # max(cos, 0)


def test_clip_score_preflight_missing_weights_and_bad_tag(hf_cache):
    from edm.eval.clip_score import CLIPScore

    with pytest.raises(MissingWeightsError) as err:
        CLIPScore(model="ViT-B-16", pretrained="openai").check()
    msg = str(err.value)
    assert "hf download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors" in msg
    with pytest.raises(ConfigError, match="eval.clip_score.pretrained"):
        CLIPScore(model="ViT-B-16", pretrained="no-such-tag").check()
    hf_cache("laion/CLIP-ViT-g-14-laion2B-s12B-b42K", "open_clip_model.safetensors", b"x")
    CLIPScore(model="ViT-g-14", pretrained="laion2b_s12b_b42k").check()  # found: no error


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


# ------------------------------------------------------------------------- preflight and configs
class _Ev:
    def __init__(self, name, exc=None):
        self.name, self.exc = name, exc

    def check(self):
        if self.exc:
            raise self.exc


def test_preflight_skips_only_missing_weights_when_asked():
    from edm.eval.weights import preflight

    evs = {"fid": _Ev("fid"), "image_reward": _Ev("image_reward", MissingWeightsError("no ckpt"))}
    with pytest.raises(MissingWeightsError):
        preflight(evs, skip_unavailable=False)
    ok, skipped = preflight(evs, skip_unavailable=True)
    assert list(ok) == ["fid"] and skipped == ["image_reward"]
    ok, skipped = preflight(list(evs.values()), skip_unavailable=True)
    assert [e.name for e in ok] == ["fid"] and skipped == ["image_reward"]
    with pytest.raises(ValueError):  # a bug is never skipped
        preflight([_Ev("x", ValueError("bug"))], skip_unavailable=True)


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("fid", {"fid"}),
        ("clip_score", {"clip_score"}),
        ("image_reward", {"image_reward"}),
        ("none", set()),
        ("paper_obsdiff", {"fid", "clip_score", "image_reward"}),
        ("paper_atedm", {"fid", "clip_score"}),
        ("default_coco", {"fid", "clip_score", "image_reward"}),
    ],
)
def test_eval_presets_compose_and_instantiate(compose_cfg, preset, expected):
    from hydra.utils import instantiate

    cfg = compose_cfg(
        f"eval={preset}", "data=coco2017" if preset == "default_coco" else "data=builtin"
    )
    nodes = {k for k, v in cfg.eval.items() if isinstance(v, dict) or hasattr(v, "items")}
    assert nodes == expected
    for name in nodes:
        assert instantiate(cfg.eval[name]).name == name
    if preset == "paper_atedm":
        assert (
            cfg.eval.fid.reference == "coco2017_val1024"
            and cfg.eval.clip_score.model == "ViT-g-14"
        )
    if preset == "paper_obsdiff":
        assert cfg.eval.primary_metric == "eval/fid" and cfg.eval.clip_score.pretrained == "openai"
    if preset == "default_coco":
        assert cfg.eval.fid.reference == f"coco2017_val{cfg.gen.height}"


def test_precompute_derives_folder_checks_data_and_fails_fast_without_inception(tmp_path):
    from edm.eval import precompute

    cfg = precompute.compose(["data=coco2014", f"data.root={tmp_path}"])
    assert precompute.reference_images_dir(cfg) == tmp_path / "val2014"
    cfg = precompute.compose(["data=coco2017", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match="eval.fid.reference=coco2017_val512"):
        precompute.reference_images_dir(cfg)
    (tmp_path / "val2014").mkdir()
    for i in range(2):
        Image.fromarray(_textures(1, i)[0]).save(tmp_path / "val2014" / f"{i}.jpg")
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt"):
        precompute.main(
            [
                "data=coco2014",
                f"data.root={tmp_path}",
                f"eval.fid.inception_path={tmp_path}/inception-2015-12-05.pt",
                f"eval.fid.cache_dir={tmp_path}/refs",
                "eval.fid.num_workers=0",
            ]
        )


class _FakeInception(nn.Module):
    """Stands in for clean-fid's TorchScript file: same interface (``layers`` on normalised 299²
    input, ``forward(x, return_features)`` resizing inside), 2048-d output, tiny compute."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_fid_loads_the_inception_file_through_clean_fid(tmp_path, mode):
    from edm.eval.fid import FID

    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.jit.save(torch.jit.script(_FakeInception()), str(wdir / "inception-2015-12-05.pt"))
    real = _textures(16, seed=3)
    (tmp_path / "real").mkdir()
    for i, a in enumerate(real):
        Image.fromarray(a).save(tmp_path / "real" / f"{i}.png")
    fid = FID(
        reference="toy_val32",
        mode=mode,
        cache_dir=str(tmp_path / "refs"),
        inception_path=str(wdir / "inception-2015-12-05.pt"),
        batch_size=8,
        device="cpu",
    )
    assert fid.build_reference(tmp_path / "real").name == f"toy_val32_{mode}.npz"
    fid.check()
    mu, sigma, n = fid.load_reference()
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and n == 16
    # Generated images go through the same path (the 2048² sqrtm itself is left to the tiny test:
    # it takes minutes on a 2-core CI machine).
    same = fid.moments(write_images(tmp_path / "same", list(real)).paths)
    np.testing.assert_allclose(same.mean, mu, rtol=1e-6, atol=1e-6)
    shifted = fid.moments(write_images(tmp_path / "sh", list(_textures(16, 3, shift=50))).paths)
    assert np.abs(shifted.mean - mu).max() > 1e-2


@pytest.mark.slow
def test_clip_score_real_open_clip_architecture_from_the_hub_cache(tmp_path, hf_cache):
    """ViT-B-16/openai with random weights saved where `hf download` puts the real ones: the
    whole offline path (resolve, create_model_and_transforms from the file, tokenizer, score)."""
    import open_clip
    from safetensors.torch import save_file

    from edm.eval.clip_score import CLIPScore

    net = open_clip.create_model("ViT-B-16", force_quick_gelu=True)
    path = hf_cache("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors", b"")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    images = write_images(tmp_path / "img", list(_textures(3, 0)))
    ev = CLIPScore(model="ViT-B-16", pretrained="openai", device="cpu")
    ev.check()
    res = ev.evaluate(images)
    loaded = ev.parts()[0]
    assert torch.equal(loaded.state_dict()["visual.proj"], net.state_dict()["visual.proj"])
    assert len(res["clip_score_per_image"]) == 3
    assert all(0.0 <= s <= 1.0 for s in res["clip_score_per_image"])


def test_fid_reference_subset_is_seeded_and_cached_separately(tmp_path):
    ref_dir = tmp_path / "real"
    ref_dir.mkdir()
    for i, a in enumerate(_textures(12, seed=5)):
        Image.fromarray(a).save(ref_dir / f"r{i:02d}.png")
    full = _fid(tmp_path).build_reference(ref_dir)
    sub = _fid(tmp_path, max_reference_images=6, reference_seed=1)
    path = sub.build_reference(ref_dir)
    assert path.name == "toy_val32_clean_tiny_n6s1.npz" and path != full
    assert sub.load_reference()[2] == 6
    again = _fid(tmp_path / "other", max_reference_images=6, reference_seed=1)
    again.build_reference(ref_dir)  # same seed -> same subset -> same statistics
    np.testing.assert_array_equal(again.load_reference()[0], sub.load_reference()[0])
    other_seed = _fid(tmp_path / "o2", max_reference_images=6, reference_seed=2)
    other_seed.build_reference(ref_dir)
    assert not np.array_equal(other_seed.load_reference()[0], sub.load_reference()[0])
