"""method.export=semi_structured (issue 15): the checks that run before loading, the 2:4 and
shape eligibility rules, and the conversion loop's refusals on CPU. The conversion itself and
its parity with the masked dense model need CUDA: tests/test_gpu.py."""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from torch import nn

from edm.errors import ConfigError
from edm.methods.weight.export import check_export, eligible, is_two_four, to_semi_structured
from edm.methods.weight.masks import parse_pattern
from edm.runner import run


def two_four(rows=64, cols=128, seed=0):
    """A linear whose weight keeps the 2 largest of every 4 inputs (magnitude 2:4)."""
    lin = nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
        groups = lin.weight.view(rows, -1, 4)
        drop = groups.abs().argsort(-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
    return lin


def test_pattern_and_values_checked_at_construction():
    assert parse_pattern("2:4") == (2, 4)
    with pytest.raises(ConfigError, match="<method.export> unknown export 'dense'"):
        check_export("dense", "2:4")
    with pytest.raises(ConfigError, match="<method.export>.*method.pattern=2:4"):
        check_export("semi_structured", "unstructured")
    with pytest.raises(ConfigError, match="<method.export>.*method.pattern=2:4"):
        check_export("semi_structured", "4:8")
    check_export(None, "unstructured", torch.device("cpu"), torch.float32)  # nothing to check


def test_device_and_dtype_checked():
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match="<method.export>.*CUDA only; this run is on cpu"):
        check_export("semi_structured", "2:4", torch.device("cpu"), torch.float16)
    with pytest.raises(ConfigError, match="<method.export>.*fp16/bf16.*torch.float32"):
        check_export("semi_structured", "2:4", cuda, torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        check_export("semi_structured", "2:4", cuda, dtype)


def _no_load(*_a, **_k):
    raise AssertionError("loaded before the bad value was rejected")


def test_cpu_run_refused_before_loading(compose_cfg):
    cfg = compose_cfg("model=tiny_sd15", "logger=none", "method=magnitude", "sparsity=0.5",
                      "method.pattern=2:4", "method.export=semi_structured")
    with patch("edm.models.tiny.TinyPipeline.load", _no_load), \
            pytest.raises(ConfigError, match="<method.export>.*CUDA only"):
        run(cfg)


def test_structured_obs_diff_rejects_export():
    from edm.methods.weight.obs_diff import obs_diff

    with pytest.raises(ConfigError, match="<method.export> applies to granularity=unstructured"):
        obs_diff(0.3, granularity="structured", export="semi_structured")


def test_two_four_and_shape_eligibility():
    lin = two_four()
    assert is_two_four(lin.weight) and eligible(lin) is None
    dense = nn.Linear(128, 64)
    assert not is_two_four(dense.weight) and eligible(dense) == "weight is not 2:4 sparse"
    three = two_four()
    with torch.no_grad():
        three.weight[0, :4] = 1.0  # one group with 4 nonzeros: compression would drop 2
    assert eligible(three) == "weight is not 2:4 sparse"
    assert "not a multiple of 32x64" in eligible(two_four(rows=48, cols=128))
    assert "not a multiple of 32x64" in eligible(two_four(rows=64, cols=96))
    assert "not nn.Linear" in eligible(nn.Conv2d(4, 4, 1))


def test_conversion_refuses_cpu_and_fp32_weights_and_leaves_them_intact():
    layers = [("a", two_four()), ("b", two_four().half()), ("c", nn.Linear(128, 64))]
    before = [m.weight.detach().clone() for _, m in layers]
    out = to_semi_structured(layers)
    assert out["converted"] == []
    assert out["skipped"] == {"a": "weight is on cpu, not CUDA", "b": "weight is on cpu, not CUDA",
                              "c": "weight is not 2:4 sparse"}
    for (_, m), w in zip(layers, before):
        assert type(m.weight.data) is torch.Tensor and torch.equal(m.weight, w)
