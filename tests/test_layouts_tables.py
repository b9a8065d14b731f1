"""experiments/layouts_tables.py renders the committed layouts study runs, and the FLOPs fit of
experiments/digits_token_flops.py finds the matching ratio."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import digits_token_flops
import layouts_tables


def test_committed_runs_render_every_row_and_keep_the_discussion(tmp_path):
    md = tmp_path / "layouts_token_quality.md"
    md.write_text("old table\n<!-- discussion -->\nkept text\n")
    layouts_tables.main(["--out", str(tmp_path)])
    text = md.read_text()
    assert text.endswith("<!-- discussion -->\nkept text\n")
    for row in ("at_edm gwpr + DSAP |", "at_edm random + DSAP, cosine refill |", "at_edm gwpr |",
                "at_edm attn_colsum + DSAP |", "tome (max_downsample=2) |"):
        assert row in text, row
    assert "not run" not in text.split("<!-- discussion -->")[0]  # 3 ratios of every row
    weight = (tmp_path / "layouts_weight_quality.md").read_text()
    assert all(f"| {m} |" in weight for m in layouts_tables.METHODS)
    assert (tmp_path / "layouts_token_quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "### copy error" in text and "model.loader.checkpoint" not in text.split("```")[1]


def test_the_flat_models_runs_render_with_their_checkpoint_in_every_command(tmp_path):
    layouts_tables.main(["--model", "flat", "--out", str(tmp_path)])
    text = (tmp_path / "layouts_flat_token_quality.md").read_text()
    assert "not run" not in text.split("<!-- discussion -->")[0] and "### copy error" not in text
    commands = [ln for ln in text.split("```")[1].splitlines() if ln.startswith("python run.py")]
    assert len(commands) == 6 and all("checkpoints/layouts_flat data.repeat=0 " in c for c in commands)
    assert "| obs_diff |" in (tmp_path / "layouts_flat_weight_quality.md").read_text()
    with pytest.raises(SystemExit, match="unknown profile"):
        layouts_tables.main(["--model", "qk9", "--out", str(tmp_path)])


def test_fit_ratio_finds_the_nearest_grid_point_of_a_decreasing_curve():
    calls = []

    def flops(r):
        calls.append(r)
        return 1.0 - 0.6 * r  # dense 1.0, falls with the ratio

    r, g = digits_token_flops.fit_ratio(0.8, flops)
    assert r == 0.33 and abs(g - 0.802) < 1e-9  # |0.802 - 0.8| < |0.796 - 0.8|
    assert len(calls) <= 9  # bisection, not a scan of 76 points
    assert digits_token_flops.fit_ratio(2.0, flops)[0] == 0.0  # beyond the ends: the nearest end
    assert digits_token_flops.fit_ratio(0.0, flops)[0] == 0.75
