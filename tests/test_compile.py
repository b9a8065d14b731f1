"""compile.enabled=true: torch.compile (CPU inductor here) of the denoiser after the method.
Images stay within 2/255 of eager (inductor may reorder float reductions; measured: identical on
tiny_sd15), FLOPs are counted in eager, bad knobs fail before loading."""

import json
from unittest.mock import patch

import numpy as np
import pytest
from PIL import Image

from edm.errors import ConfigError
from edm.runner import run


def _run(compose_cfg, tmp_path, name, *extra):
    cfg = compose_cfg("model=tiny_sd15", "logger=none", "data.num_prompts=2", "gen.batch_size=2",
                      "threads=1", *extra)
    cfg.paths.output_dir = str(tmp_path / name)
    cfg.gen.images_dir = str(tmp_path / name / "images")
    run(cfg)
    rec = json.loads((tmp_path / name / "metrics.json").read_text())
    imgs = [np.asarray(Image.open(p)).astype(int)
            for p in sorted((tmp_path / name / "images").glob("*.png"))]
    return rec["metrics"], imgs


def _check_close(compose_cfg, tmp_path, *method):
    eager, a = _run(compose_cfg, tmp_path, "eager", *method)
    compiled, b = _run(compose_cfg, tmp_path, "compiled", "compile.enabled=true", *method)
    assert compiled["perf/compiled"] == 1 and "perf/compiled" not in eager
    assert compiled["perf/compile_freezing"] == 1  # compile.freezing=null -> on for CPU
    assert compiled["perf/gflops_per_step"] == pytest.approx(eager["perf/gflops_per_step"])
    assert len(a) == len(b) == 2
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b)) <= 2


def test_compiled_dense_matches_eager(compose_cfg, tmp_path):
    _check_close(compose_cfg, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["method=tome", "method=magnitude", "method=at_edm"])
def test_compiled_method_matches_eager(compose_cfg, tmp_path, method):
    _check_close(compose_cfg, tmp_path, method)


def _no_load(*_a, **_k):
    raise AssertionError("loaded before the bad value was rejected")


@pytest.mark.parametrize("override,key", [("compile.mode=fastest", "compile.mode"),
                                          ("compile.dynamic=sometimes", "compile.dynamic"),
                                          ("compile.freezing=maybe", "compile.freezing")])
def test_bad_compile_knobs_fail_before_loading(compose_cfg, override, key):
    cfg = compose_cfg("model=tiny_sd15", "logger=none", "compile.enabled=true", override)
    with patch("edm.models.tiny.TinyPipeline.load", _no_load), \
            pytest.raises(ConfigError, match=f"<{key}>"):
        run(cfg)


@pytest.mark.parametrize("model,method,needle", [
    ("tiny_sd15", "method=pab", "diffusers' cache hooks"),
    ("tiny_sd15", "method=taylorseer_cache", "torch.compiler.disable"),
    ("tiny_sd15", "method.profile=wall", "profile=wall"),
])
def test_fullgraph_refused_for_methods_that_break_the_graph(compose_cfg, model, method, needle):
    extra = ["method=at_edm", method] if method.startswith("method.") else [method]
    cfg = compose_cfg(f"model={model}", "logger=none", "compile.enabled=true",
                      "compile.fullgraph=true", *extra)
    with patch("edm.models.tiny.TinyPipeline.load", _no_load), \
            pytest.raises(ConfigError, match=f"<compile.fullgraph>.*{needle}"):
        run(cfg)
