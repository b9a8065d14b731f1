"""Every method's default on the embedded model: wall time on one thread and what it gives.

Runs ``python run.py method=<m> threads=1 logger=none`` for every ``conf/method/*.yaml`` (the
command a new user types), one at a time, and writes ``experiments/results/method_defaults.md``:
wall time of the whole command (load, calibrate, prune, generate 100 images, evaluate), digit FID,
prompt accuracy and what the method did (measured sparsity / token ratio, parameters).

    python experiments/method_defaults.py                     # all methods
    python experiments/method_defaults.py --methods none,at_edm --out /tmp/defaults.md

Times are wall-clock on whatever machine runs it (the committed table: the 2-core development
machine, 1 torch thread); the goal is "under 2 minutes", so noise of a few seconds does not matter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results" / "method_defaults.md"


def runs_on_digits(method: str) -> bool:
    """Methods that refuse the digits family (e.g. First-Block-Cache: transformers only) are
    not defaults a digits user can run; they are left out, not reported as failures."""
    from edm.configs import method as build
    from edm.errors import UnsupportedFamily

    try:
        build(f"method={method}").check("digits")
    except UnsupportedFamily:
        return False
    return True


def run_default(method: str, workdir: Path) -> dict:
    out = workdir / method
    cmd = [sys.executable, "run.py", f"method={method}", "threads=1", "logger=none",
           "gen.progress=false", f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        return {"method": method, "wall": wall, "error": res.stderr.strip().splitlines()[-1]}
    rec = json.loads((out / "metrics.json").read_text())
    return {"method": method, "wall": wall, "metrics": rec["metrics"], "run": rec["run"]}


def _did(m: dict) -> str:
    parts = []
    if "method/sparsity" in m:
        parts.append(f"sparsity {m['method/sparsity']:.3f}")
    for k, v in m.items():
        if k.endswith("token_ratio_measured"):
            parts.append(f"tokens removed {v:.3f}")
    if m.get("perf/params_m") and m.get("perf/dense_params_m") and \
            m["perf/params_m"] < m["perf/dense_params_m"]:
        parts.append(f"params {m['perf/params_m']:.3f}/{m['perf/dense_params_m']:.3f} M")
    return ", ".join(parts) or "dense"


def render(rows: list[dict]) -> str:
    lines = [
        "# Every method's default on the embedded model (`model=digits`)",
        "",
        "`python run.py method=<method> threads=1 logger=none` (100 prompts, DDIM 25 steps, "
        "CFG 1.5); wall time of the whole command on the 2-core development machine, one torch "
        "thread. Produced by `python experiments/method_defaults.py`.",
        "",
        "| method | wall (s) | digit FID | prompt acc | what it did | sec/image |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['wall']:.0f} | failed: {r['error']} | | | |")
            continue
        m = r["metrics"]
        lines.append(
            f"| {r['method']} | {r['wall']:.0f} | {m.get('eval/digit_fid', float('nan')):.2f} | "
            f"{m.get('eval/prompt_acc', float('nan')):.2f} | {_did(m)} | "
            f"{m.get('perf/sec_per_image', float('nan')):.3f} |")
    floor = next((r["metrics"].get("eval/digit_fid_floor") for r in rows if "metrics" in r), None)
    if floor is not None:
        lines += ["", f"Digit FID floor (real vs real, 100 images): {floor:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=None, help="comma-separated; default: every conf/method")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    methods = (args.methods.split(",") if args.methods else
               [m for m in sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
                if runs_on_digits(m)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            r = run_default(m, Path(tmp))
            rows.append(r)
            print(f"{m}: {r['wall']:.0f} s {r.get('error', '')}", flush=True)
    args.out.write_text(render(rows))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
