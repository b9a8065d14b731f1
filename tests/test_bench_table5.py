"""experiments/bench_table5.py (OBS-Diff Table 5): the blocks it times and its report, at a tiny
width; the 2:4 row needs CUDA's semi-structured kernels and says so elsewhere."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_table5 as B

TINY = ["--heads", "4", "--batch", "1", "--image-tokens", "16", "--text-tokens", "8",
        "--repeats", "2", "--warmup", "1", "--threads", "1"]


def test_structured_blocks_are_sliced_and_compute_the_same_shapes():
    dense = B.sd35_block(heads=4)
    assert dense.attn.heads == 4 and dense.norm1.linear.in_features == 4 * 64  # SD3.5-L head dim
    assert dense.attn.norm_q is not None  # SD3.5-L's RMS q/k norm
    sliced = B.structured(dense, 0.3)
    assert sliced.attn.heads == 3  # round(4 * 0.3) = 1 head removed, text and image streams
    assert sliced.attn.add_q_proj.out_features == 3 * 64
    assert sliced.ff.net[2].in_features == 1024 - round(1024 * 0.3)
    assert sliced.ff_context.net[2].in_features == 1024 - round(1024 * 0.3)
    assert dense.attn.heads == 4  # the dense block is untouched
    kw = {"hidden_states": torch.randn(1, 16, 256), "encoder_hidden_states": torch.randn(1, 8, 256),
          "temb": torch.randn(1, 256)}
    with torch.no_grad():
        for a, b in zip(dense(**kw), sliced(**kw)):
            assert a.shape == b.shape


def test_tiny_run_reports_every_row_and_2to4_not_run_on_cpu(tmp_path):
    out = tmp_path / "t5.md"
    md = B.main(["--device", "cpu", *TINY, "--out", str(out)])
    assert out.read_text() == md
    assert f"| 2:4 | 11.71 | 1.23x | {B.NO_SPARSE} |" in md
    for row in ("dense", "structured 15%", "structured 20%", "structured 25%", "structured 30%"):
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {row} |"))
        ms, speedup, fastest, fast_up = line.split(" | ")[3:7]
        assert float(ms) >= float(fastest) > 0 and speedup.endswith("x") and fast_up.endswith("x")
    assert "| dense | 14.36 | – |" in md and "1.00x | " in md  # ratios to dense, same process
    assert "batch 1, 16 image + 8 text tokens, width 256" in md


def test_cpu_clock_is_for_one_cpu_thread_only():
    md = B.main(["--device", "cpu", *TINY, "--clock", "cpu"])
    assert "thread CPU time" in md and "--clock cpu" in md  # the command is in the report
    with pytest.raises(SystemExit):
        B.main(["--device", "cpu", *TINY[:-1], "2", "--clock", "cpu"])  # --threads 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_2to4_runs_on_cuda(tmp_path):
    md = B.main(["--device", "cuda", "--dtype", "fp16", "--heads", "4", "--batch", "2",
                 "--image-tokens", "256", "--text-tokens", "64", "--repeats", "3"])
    line = next(ln for ln in md.splitlines() if ln.startswith("| 2:4 |"))
    assert "not run" not in line, line
