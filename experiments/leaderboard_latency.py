"""Re-time every leaderboard row against the dense pipeline, alternated, in one process.

A sweep job's ``perf/sec_per_image`` is one timing of one run, taken while whatever else ran on
the machine; on a shared CPU two runs of the same pipeline differ by 2x. Here every row's
pipeline is built exactly as its run built it (the row's config composed with Hydra, then
``edm.runner``'s own plan / load / apply / compile steps), and each timed batch is alternated with
the same batch on one dense pipeline (order swapped every round), so both see the same machine.
On CPU the clock is the thread's CPU time (``time.thread_time``: what other processes do does not
count; the run's ``threads`` pins torch to one thread) next to the wall clock; on CUDA it is the
wall clock after a synchronize. A first untimed call per pipeline warms up (and compiles, for the
``compiled`` row: its compile time is that call minus a timed one).

    python experiments/leaderboard.py digits --latency                 # all rows, then render
    python experiments/leaderboard.py digits --latency --rows dense,tome_1 --rounds 5

Results go to ``experiments/results/leaderboard_runs/<model>/latency.json`` after every row (a
rerun skips rows already there unless ``--rows`` names them).
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
ROW_KEY = "experiment/leaderboard_rows"


def sweep_rows(model: str) -> list[str]:
    """The rows ``experiment=leaderboard_<model>`` sweeps, in its order."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from edm.configs import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=leaderboard_{model}"],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    return [r.strip() for r in str(cfg.hydra.sweeper.params[f"+{ROW_KEY}"]).split(",") if r.strip()]


def build(model: str, row: str, out_dir: Path):
    """``(plan, pipe)`` of one row, prepared as its run prepared it (no evaluators, no images)."""
    from edm import configs, runner

    cfg = configs.compose(f"experiment=leaderboard_{model}", f"+{ROW_KEY}={row}", "logger=none",
                          "eval=none", f"paths.output_dir={out_dir}", "gen.progress=false")
    plan = runner.plan_run(cfg)
    pipe = runner.load_pipeline(plan)
    t0 = time.perf_counter()
    runner.apply_method(plan, pipe)
    runner.compile_denoiser(plan, pipe)
    return plan, pipe, time.perf_counter() - t0


def _timed(pipe, plan) -> tuple[float, float]:
    """(primary clock, wall) seconds per image of one batch of the row's own prompts."""
    import torch

    from edm.generate import call_pipe

    batch = plan.items[: int(plan.gen["batch_size"])]
    cuda = plan.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(plan.device)
    w0, c0 = time.perf_counter(), time.thread_time()
    call_pipe(pipe, batch, plan.gen, plan.device)
    if cuda:
        torch.cuda.synchronize(plan.device)
    wall = (time.perf_counter() - w0) / len(batch)
    return (wall if cuda else (time.thread_time() - c0) / len(batch)), wall


def measure(model: str, path: Path, rounds: int = 3, rows: list[str] | None = None) -> dict:
    names = rows or sweep_rows(model)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("rows", {})
    todo = [r for r in names if rows or r not in data["rows"]]
    if not todo:
        return data
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dense_plan, dense_pipe, _ = build(model, "dense", Path(tmp) / "_dense")
        _timed(dense_pipe, dense_plan)  # warm-up
        clock = "wall (CUDA synchronized)" if dense_plan.device.type == "cuda" else "thread CPU time"
        data["command"] = (f"python experiments/leaderboard.py {model} --latency --rounds {rounds}")
        data["how"] = (f"every row's batch of {dense_plan.gen['batch_size']} images timed "
                       f"{rounds}x, alternated with the same batch on one dense pipeline (order "
                       f"swapped each round), {clock}, median; speed-up = dense / row; "
                       f"threads={dense_plan.cfg.threads}, device {dense_plan.device.type}.")
        for row in todo:
            t_build = time.perf_counter()
            plan, pipe, prepare = build(model, row, Path(tmp) / row)
            w0 = time.perf_counter()
            _timed(pipe, plan)  # warm-up (compiles a compiled denoiser)
            warm = time.perf_counter() - w0
            ours, dense, walls = [], [], []
            for r in range(rounds):
                pair = [(pipe, plan, ours), (dense_pipe, dense_plan, dense)]
                for p, pl, acc in (pair if r % 2 == 0 else pair[::-1]):
                    t, w = _timed(p, pl)
                    acc.append(t)
                    if p is pipe:
                        walls.append(w)
            rec = {"sec_per_image": statistics.median(ours),
                   "sec_per_image_wall": statistics.median(walls),
                   "dense_sec_per_image": statistics.median(dense),
                   "speedup": statistics.median(dense) / statistics.median(ours),
                   "rounds": rounds, "prepare_s": prepare,
                   "build_s": time.perf_counter() - t_build}
            if plan.cfg.get("compile") and plan.cfg.compile.enabled:
                rec["compile_s"] = max(warm - statistics.median(walls) * len(plan.items[
                    : int(plan.gen["batch_size"])]), 0.0)
            data["rows"][row] = rec
            path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            print(f"{row}: {rec['sec_per_image']:.4f} s/image vs dense "
                  f"{rec['dense_sec_per_image']:.4f} -> {rec['speedup']:.2f}x", flush=True)
            del pipe, plan
            gc.collect()
    return data
