"""SLURM launcher presets (fast, no cluster) and a real sweep on the local cluster (``-m slurm``).

The fast tests compose the project's primary config with each launcher preset and check what the
submitit plugin would hand to submitit, with a MagicMock executor (as the plugin's own tests do)
and with submitit's real executors, which reject unknown parameter names.

The integration tests (``pytest -m slurm``) need ``bash slurm/local-cluster.sh up``: a 2 x 2
sweep of the embedded default model as one SLURM array, and slurm/sharded.sh (shard jobs plus an
eval-only job) compared with an unsharded run. They skip with the reason when no cluster is up.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest.mock import MagicMock, patch

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
LOCAL_EXAMPLE = """# @package _global_
cluster:
  partition: cpu_q
  gpu_partition: gpu_q
  account: acct1
  qos: high
  setup: ["export HF_HUB_OFFLINE=1", "echo setup-ran"]
  additional_parameters: {mail-type: FAIL}
"""


@pytest.fixture
def conf_dir(tmp_path):
    """A copy of conf/ without the developer's git-ignored conf/local/, so results don't depend
    on the machine; tests that need a local config write one into the copy."""
    dst = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", dst, ignore=shutil.ignore_patterns("local"))
    return dst


def _compose(conf_dir: Path, *overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _instantiate_launcher(cfg):
    """Instantiate hydra.launcher the way Hydra does for ``-m``."""
    return Plugins.instance().instantiate_launcher(
        hydra_context=MagicMock(), task_function=MagicMock(), config=cfg)


def _launch_with_mock(cfg, n_jobs: int = 2):
    """Run the plugin's launch() with submitit.AutoExecutor mocked; return the mock."""
    launcher = _instantiate_launcher(cfg)
    job = MagicMock()
    job.results.return_value = ["job-return"]
    with patch("submitit.AutoExecutor") as auto:
        auto.return_value.map_array.return_value = [job] * n_jobs
        returns = launcher.launch([[f"seed={i}"] for i in range(n_jobs)], initial_job_idx=0)
    assert returns == ["job-return"] * n_jobs
    return auto


def test_slurm_preset_defaults(conf_dir, tmp_path):
    cfg = _compose(conf_dir, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep")
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("submitit_launcher.SlurmLauncher")
    # Requeue on timeout is on, because the runner resumes (slurm/README.md).
    assert lc.max_num_timeout > 0
    assert lc.submitit_folder == f"{tmp_path}/sweep/.submitit/%j"
    # No local config: cluster-specific values fall back to SLURM's defaults.
    assert lc.partition is None and lc.account is None and lc.qos is None
    assert list(lc.setup) == [] and dict(lc.additional_parameters) == {}
    assert lc.gpus_per_node is None and lc.cpus_per_task >= 1 and lc.timeout_min > 0


def test_experiment_can_choose_the_launcher(conf_dir, tmp_path):
    """Guards the Hydra gotcha: a launcher chosen in the primary config silently beats the one an
    experiment file chooses, so the primary config must not choose one."""
    (conf_dir / "experiment" / "slurm_probe.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/launcher: slurm_gpu_example\n")
    cfg = _compose(conf_dir, "experiment=slurm_probe", f"hydra.sweep.dir={tmp_path}/sweep")
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_slurm_params_reach_submitit(conf_dir, tmp_path):
    (conf_dir / "local").mkdir()
    (conf_dir / "local" / "default.yaml").write_text(LOCAL_EXAMPLE)
    cfg = _compose(conf_dir, "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep",
                   "hydra.launcher.mem_gb=3")
    auto = _launch_with_mock(cfg)

    init = auto.call_args.kwargs
    assert init == {"cluster": "slurm", "folder": f"{tmp_path}/sweep/.submitit/%j",
                    "slurm_max_num_timeout": cfg.hydra.launcher.max_num_timeout}
    params = auto.return_value.update_parameters.call_args.kwargs
    assert params["slurm_partition"] == "cpu_q"
    assert params["slurm_account"] == "acct1"
    assert params["slurm_qos"] == "high"
    assert params["slurm_setup"] == ["export HF_HUB_OFFLINE=1", "echo setup-ran"]
    assert params["slurm_additional_parameters"] == {"mail-type": "FAIL"}
    assert params["mem_gb"] == 3 and params["gpus_per_node"] is None
    assert params["slurm_array_parallelism"] == cfg.hydra.launcher.array_parallelism
    # One array submission holding both sweep points.
    (_fn, overrides, *_rest), _ = auto.return_value.map_array.call_args
    assert [list(o) for o in overrides] == [["seed=0"], ["seed=1"]]

    # submitit's real executor accepts exactly these names (it raises on unknown ones and
    # renders the sbatch script to check values). Only its "is srun on PATH?" probe is faked, so
    # this runs on a machine that has never seen SLURM (a new user's laptop, CI before the
    # local cluster starts).
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    with patch.object(SlurmExecutor, "affinity", classmethod(lambda cls: 2)):
        real = submitit.AutoExecutor(**{**init, "folder": str(tmp_path / "real" / "%j")})
        real.update_parameters(**params)
        with pytest.raises(NameError, match="Unknown argument .not_a_submitit_name."):
            real.update_parameters(slurm_not_a_submitit_name=1)


def test_gpu_example_uses_gpu_partition(conf_dir, tmp_path):
    (conf_dir / "local").mkdir()
    (conf_dir / "local" / "default.yaml").write_text(LOCAL_EXAMPLE)
    cfg = _compose(conf_dir, "hydra/launcher=slurm_gpu_example",
                   f"hydra.sweep.dir={tmp_path}/sweep")
    params = _launch_with_mock(cfg).return_value.update_parameters.call_args.kwargs
    assert params["gpus_per_node"] == 1
    assert params["slurm_partition"] == "gpu_q"
    assert params["slurm_account"] == "acct1"  # inherited from the slurm preset


def test_local_preset_reaches_local_executor(conf_dir, tmp_path):
    cfg = _compose(conf_dir, "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}/sweep")
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    auto = _launch_with_mock(cfg)
    assert auto.call_args.kwargs["cluster"] == "local"
    import submitit

    real = submitit.AutoExecutor(cluster="local", folder=str(tmp_path / "real" / "%j"))
    real.update_parameters(**auto.return_value.update_parameters.call_args.kwargs)


def test_local_config_does_not_break_the_basic_launcher(conf_dir, tmp_path):
    """conf/local/default.yaml is loaded for every run: its cluster values must stay out of
    hydra.launcher unless a SLURM preset is chosen (the basic launcher rejects extra keys)."""
    (conf_dir / "local").mkdir()
    (conf_dir / "local" / "default.yaml").write_text(LOCAL_EXAMPLE)
    cfg = _compose(conf_dir, f"hydra.sweep.dir={tmp_path}/sweep")
    assert cfg.hydra.launcher._target_.endswith("basic_launcher.BasicLauncher")
    assert cfg.cluster.partition == "cpu_q"
    _instantiate_launcher(cfg)


# ------------------------------------------------------------------ real cluster -------------

@functools.lru_cache(maxsize=1)  # sinfo takes ~10 s to give up on a stopped controller
def _cluster_unavailable() -> str | None:
    """Why the local cluster can't be used, or None when a node is up and schedulable."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return ("SLURM client not installed (sinfo/sbatch missing): "
                "run `bash slurm/local-cluster.sh up`")
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], check=False, capture_output=True,
                           text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld up? (`bash slurm/local-cluster.sh status`)"
    states = p.stdout.split()
    usable = ("idle", "mixed", "allocated")
    if p.returncode != 0 or not any(s.rstrip("*") in usable for s in states):
        msg = (p.stderr or p.stdout).strip().splitlines()
        return f"SLURM cluster not up ({msg[-1] if msg else 'no usable node'}): " \
               "run `bash slurm/local-cluster.sh up`"
    return None


def _cancel_jobs_under(root: Path) -> None:
    """scancel the jobs submitted from sweeps under ``root`` (ids from submitit's folders)."""
    ids = {d.name.split("_")[0] for d in root.rglob(".submitit/*") if d.is_dir()}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], check=False)


def _run(cmd: list[str], tmp_path: Path, timeout: int = 600) -> None:
    """Run a command from the repo root with outputs under tmp_path; on timeout cancel its jobs.

    EDM_SLURM_TEST_OVERRIDES (space-separated) is appended to run.py commands, e.g.
    ``hydra.launcher.partition=debug`` to run these tests against another cluster.
    """
    env = {**os.environ, "EDM_OUTPUT_ROOT": str(tmp_path / "outputs"), "PYTHON": sys.executable}
    cmd = cmd + os.environ.get("EDM_SLURM_TEST_OVERRIDES", "").split()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        _cancel_jobs_under(tmp_path)
        raise
    assert proc.returncode == 0, \
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# Small jobs: 2 run side by side on the 2-CPU local node.
SMALL_JOBS = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
              "hydra.launcher.timeout_min=15"]
DIGITS = ["model=digits", "logger=none", "threads=1"]


def _evals(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("eval/")}


@pytest.mark.slurm
def test_sweep_runs_on_local_cluster(tmp_path):
    """2 seeds x 2 methods on the embedded default model as one SLURM array."""
    reason = _cluster_unavailable()
    if reason:
        pytest.skip(reason)
    sweep, num_prompts = tmp_path / "sweep", 4
    _run([sys.executable, "run.py", "-m", "seed=0,1", "method=none,magnitude",
          "hydra/launcher=slurm", *DIGITS, f"data.num_prompts={num_prompts}",
          f"hydra.sweep.dir={sweep}", *SMALL_JOBS], tmp_path)

    job_dirs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(job_dirs) == 4, f"expected 4 metrics.json, found {job_dirs}"
    seen = set()
    for d in job_dirs:
        m = json.loads((d / "metrics.json").read_text())
        run = m["run"]
        seen.add((run["seed"], run["method"]))
        # The sweep point's overrides are the ones this job ran with.
        name = str(d.relative_to(sweep))
        assert f"seed={run['seed']}" in name and f"method={run['method']}" in name
        assert run["num_items"] == num_prompts and run["missing_images"] == 0
        assert m["metrics"]["perf/images_generated"] == num_prompts
        evals = _evals(m["metrics"])
        assert evals and all(math.isfinite(v) for v in evals.values()), evals
        assert len(list(Path(run["images_dir"]).glob("*.png"))) == num_prompts
        # It ran as a SLURM array task: submitit's job id is "<array job>_<task>".
        job_id = OmegaConf.load(d / ".hydra" / "hydra.yaml").hydra.job.id
        assert re.fullmatch(r"\d+_\d+", str(job_id)), job_id
    assert seen == {(0, "none"), (1, "none"), (0, "magnitude"), (1, "magnitude")}


@pytest.mark.slurm
def test_sharded_generation_equals_unsharded(tmp_path):
    """slurm/sharded.sh: 2 shard jobs into one images dir, then one eval-only job; the images
    and metrics equal those of an unsharded run in this process."""
    reason = _cluster_unavailable()
    if reason:
        pytest.skip(reason)
    import numpy as np
    from PIL import Image

    n, shared, ref = 6, tmp_path / "shared", tmp_path / "ref"
    common = [*DIGITS, f"data.num_prompts={n}"]
    _run(["bash", "slurm/sharded.sh", "2", str(shared), *common, *SMALL_JOBS], tmp_path)
    _run([sys.executable, "run.py", *common, f"gen.images_dir={ref}"], tmp_path)

    names = sorted(p.name for p in shared.glob("*.png"))
    assert names == sorted(p.name for p in ref.glob("*.png")) and len(names) == n
    for name in names:
        a, b = (np.asarray(Image.open(d / name)) for d in (shared, ref))
        assert np.array_equal(a, b), f"{name}: sharded image differs (max |diff| " \
            f"{np.abs(a.astype(int) - b.astype(int)).max()})"

    outputs = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("metrics.json")]
    # The eval-only job's sweep subdir is named after its overrides.
    eval_only = [m for m in outputs if "gen.enabled=false" in m["run"]["output_dir"].lower()]
    unsharded = [m for m in outputs if m["run"]["images_dir"] == str(ref)]
    assert len(eval_only) == 1 and len(unsharded) == 1, [m["run"] for m in outputs]
    assert eval_only[0]["run"]["missing_images"] == 0
    got, want = _evals(eval_only[0]["metrics"]), _evals(unsharded[0]["metrics"])
    assert want and got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6) for k in want), (got, want)
