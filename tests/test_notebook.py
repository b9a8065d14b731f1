"""notebooks/analysis.ipynb executes on real (tiny) embedded-default results.

Two quick digits runs (dense and 50 % magnitude, 3 steps, 6 prompts) go through the real runner
into a temporary results folder; the notebook is then executed top to bottom by a python3 kernel
of this interpreter with ``EDM_RESULTS`` pointing there. The executed copy is never written back:
the notebook stays output-stripped in git.
"""

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from edm.runner import run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
FAST = ["logger=none", "gen.num_inference_steps=3", "data.num_prompts=6", "gen.batch_size=6",
        "gen.warmup=false", "perf.latency_batches=0", "threads=1"]


def test_notebook_is_output_stripped():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_analysis_notebook_executes(compose_cfg, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    results = tmp_path / "results"
    for name, overrides in (("dense", ["method=none"]),
                            ("magnitude", ["method=magnitude", "sparsity=0.5"])):
        cfg = compose_cfg(*FAST, *overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(results / name)  # gen.images_dir follows (interpolated)
        run(cfg)
    assert len(list(results.rglob("metrics.json"))) == 2

    monkeypatch.setenv("EDM_RESULTS", str(results))  # inherited by the kernel process
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell

    # the sweep table lists both runs, and the plot was written into the results folder
    table = next(o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.get("output_type") == "execute_result")
    text = table["data"]["text/plain"]
    assert "none" in text and "magnitude" in text
    assert (results / "quality_vs_sparsity.png").stat().st_size > 0
    # the executed copy lives only in memory: the file on disk is still stripped
    assert all(not c.get("outputs") for c in json.loads(NOTEBOOK.read_text())["cells"]
               if c["cell_type"] == "code")
