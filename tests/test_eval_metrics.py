"""FID, CLIP score and ImageReward evaluators, offline, with tiny injected models/checkpoints.

Real weights are never needed: FID takes an injected feature model, CLIP score an open_clip-like
loader, and ImageReward a tiny random checkpoint written in the official key layout into a
temporary Hugging Face cache. Faithfulness of ImageReward to the upstream package at full size is
checked by experiments/image_reward_parity/run_parity.sh (not in CI).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from helpers import write_images
from PIL import Image
from torch import nn

from edm.errors import ConfigError, MissingWeightsError
from edm.eval.base import PromptItem


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
        ("paired", {"paired"}),
        ("paper_obsdiff", {"fid", "clip_score", "image_reward", "paired"}),
        ("paper_atedm", {"fid", "clip_score", "paired"}),
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
