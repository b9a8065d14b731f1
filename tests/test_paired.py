"""eval=paired: PSNR / SSIM / LPIPS against the dense model's images (torchmetrics), with the
dense references made once per (model, data, protocol) and found again by key (issue 13)."""

import json
import math
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from edm.errors import ConfigError, MissingWeightsError
from edm.runner import run


@pytest.fixture
def lpips_home(tmp_path, monkeypatch):
    """A torch hub cache holding an AlexNet checkpoint where torchvision looks for it. Random
    weights (no download here): LPIPS values are then not the published metric, but identity
    (0 for equal images), ordering by distortion and the offline wiring are what is tested."""
    import torchvision

    from edm.eval.paired import lpips_backbone_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = lpips_backbone_file("alex")
    path.parent.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


def _metrics(cfg):
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def _cfg(compose_cfg, tmp_path, name, *extra):
    cfg = compose_cfg("eval=[digits,paired]", "logger=none", "data.num_prompts=12",
                      f"eval.paired.root={tmp_path / 'refs'}", "threads=1", *extra)
    cfg.paths.output_dir = str(tmp_path / name)
    cfg.gen.images_dir = str(tmp_path / name / "images")
    return cfg


def test_dense_run_against_itself_is_identical_and_a_pruned_run_reuses_the_references(
        compose_cfg, tmp_path, lpips_home):
    dense = _cfg(compose_cfg, tmp_path, "dense")
    run(dense)
    m = _metrics(dense)["metrics"]
    refs = Path(_metrics(dense)["run"]["eval_meta"]["paired"]["reference_dir"])
    assert refs.parent == tmp_path / "refs" and m["perf/dense_refs_generated"] == 12
    for i in range(12):  # generated independently, byte-identical to the run's own images
        name = f"{i:06d}.png"
        assert (refs / name).read_bytes() == (tmp_path / "dense" / "images" / name).read_bytes()
    assert m["eval/psnr"] == math.inf and m["eval/ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["eval/lpips"] == pytest.approx(0.0, abs=1e-6)
    assert json.loads((refs / "reference.json").read_text())["gen"]["num_inference_steps"] == \
        dense.gen.num_inference_steps

    pruned = _cfg(compose_cfg, tmp_path, "pruned", "method=magnitude", "sparsity=0.5")
    run(pruned)
    rec = _metrics(pruned)
    m = rec["metrics"]
    assert m["perf/dense_refs_generated"] == 0  # found by key, not remade
    assert rec["run"]["eval_meta"]["paired"]["reference_dir"] == str(refs)
    assert math.isfinite(m["eval/psnr"]) and 5 < m["eval/psnr"] < 60
    assert m["eval/ssim"] < 1 and m["eval/lpips"] > 0
    assert len(rec["per_image"]["psnr_per_image"]) == 12


def test_a_different_protocol_gets_its_own_references(compose_job, tmp_path):
    from hydra.utils import instantiate

    from edm.data.prompts import assign_seeds
    from edm.eval.dense_ref import reference_dir

    def folder(*o):
        cfg = compose_job(["data.num_prompts=4", *o])
        items = assign_seeds(instantiate(cfg.data).load(), int(cfg.seed))
        return reference_dir(cfg, items, torch.device("cpu"), tmp_path)[0]

    base = folder()
    assert folder("method=wanda") == base == folder("then=tome", "gen.shard=0")
    assert len({base, folder("gen.num_inference_steps=7"), folder("gen.guidance_scale=2"),
                folder("seed=1"), folder("data.num_prompts=5")}) == 5


def _no_load(*_a, **_k):
    raise AssertionError("loaded before the bad value was rejected")


def test_eval_only_without_references_fails_before_loading(compose_cfg, tmp_path):
    cfg = _cfg(compose_cfg, tmp_path, "evalonly", "gen.enabled=false",
               "eval.paired.metrics=[psnr,ssim]")
    with patch("edm.digits.loader.DigitsLoader.load", _no_load), \
            pytest.raises(ConfigError, match=r"<eval.paired.make_reference>.*gen.enabled=false"):
        run(cfg)


def test_missing_lpips_backbone_names_the_file(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = _cfg(compose_cfg, tmp_path, "nolpips")
    with patch("edm.digits.loader.DigitsLoader.load", _no_load), \
            pytest.raises(MissingWeightsError, match=r"(?s)alexnet-owt-7be5be79.pth.*torchvision"):
        run(cfg)


def test_scores_order_by_distortion(lpips_home):
    from edm.eval.paired import PairedFidelity

    ev = PairedFidelity()
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 32, 32, generator=g)
    small = (ref + 0.02 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    large = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    a, b = ev._scores(small, ref), ev._scores(large, ref)
    for i in range(2):
        assert a["psnr"][i] > b["psnr"][i] and a["ssim"][i] > b["ssim"][i]
        assert a["lpips"][i] < b["lpips"][i]
    # PSNR as defined: 10 log10(1 / MSE), per image
    mse = ((small[0] - ref[0]) ** 2).mean()
    assert a["psnr"][0] == pytest.approx(float(10 * torch.log10(1 / mse)), rel=1e-5)


def test_bad_metric_names_are_config_errors():
    from edm.eval.paired import PairedFidelity

    with pytest.raises(ConfigError, match="<eval.paired.metrics>"):
        PairedFidelity(metrics=["fid"])
    with pytest.raises(ConfigError, match="<eval.paired.lpips_net>"):
        PairedFidelity(lpips_net="resnet")


def test_fewer_steps_is_compared_with_the_dense_models_own_steps(compose_cfg, tmp_path):
    """method=fewer_steps changes gen.num_inference_steps; its dense reference is still the
    model's own protocol (Method.reference_gen), not a dense run at the reduced steps."""
    metrics = "eval.paired.metrics=[psnr,ssim]"
    dense = _cfg(compose_cfg, tmp_path, "dense", metrics)
    run(dense)
    few = _cfg(compose_cfg, tmp_path, "few", metrics, "method=fewer_steps",
               "method.num_inference_steps=5")
    assert few.gen.num_inference_steps == 5 != dense.gen.num_inference_steps
    run(few)
    d, f = _metrics(dense), _metrics(few)
    assert f["metrics"]["perf/dense_refs_generated"] == 0
    assert f["run"]["eval_meta"]["paired"]["reference_dir"] == \
        d["run"]["eval_meta"]["paired"]["reference_dir"]
    assert math.isfinite(f["metrics"]["eval/psnr"]) and f["metrics"]["eval/ssim"] < 1
