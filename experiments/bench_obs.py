"""Benchmark of the weight-pruning solvers (issue 3, item 9a/9b). Not a test: numbers are
measured in one run on this machine and printed as ratios.

(a) Layer-wise solve time and reconstruction error ||W X - W_hat X|| at 50 % unstructured for
    OBS-Diff (log-decrease weighted H), SparseGPT (uniform H), Wanda and magnitude
      * on real activations of the embedded digits model (all 70 targeted linears; trained weights
        if present, else the random-init architecture, said so in the output), calibrated on 8
        prompts and evaluated on 8 *held-out* prompts/seeds;
      * on random correlated inputs whose covariance drifts over 10 "steps".
    Errors are relative: sum_t a_t ||(W - W_hat) X_t||^2 / sum_t a_t ||W X_t||^2 with a_t the
    log-decrease weights ("weighted") or 1 ("uniform"), averaged over layers.
(b) Peak memory of OBS-Diff with 1 vs 4 module packages on a mid-size SD3-shaped MMDiT (6 blocks,
    width 512, random weights), each configuration in a fresh subprocess so the peak RSS is its
    own.

Usage:
    python experiments/bench_obs.py --out experiments/results/bench_obs.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from edm.eval.base import PromptItem
from edm.methods.base import ApplyContext
from edm.methods.weight.calibrate import CalibSettings, collect_stats
from edm.methods.weight.hessian import HessianStat, timestep_weights
from edm.methods.weight.magnitude import magnitude_prune
from edm.methods.weight.obs import obs_prune
from edm.methods.weight.wanda import wanda_prune

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class Prompts:
    def __init__(self, items):
        self.items = items

    def load(self):
        return list(self.items)


def digit_items(start: int, n: int) -> list[PromptItem]:
    return [
        PromptItem(i, f"a handwritten digit {WORDS[i % 10]}", seed=i)
        for i in range(start, start + n)
    ]


# ---- (a) solvers -----------------------------------------------------------------------------
def solve_all(W, H_w, H_u, sq_norm, sparsity=0.5):
    """{method: (W_hat, seconds)} for the four solvers on one layer."""
    out = {}
    for name, fn in (
        ("obs_diff", lambda: obs_prune(W, H_w, sparsity)[0]),
        ("sparsegpt", lambda: obs_prune(W, H_u, sparsity)[0]),
        ("wanda", lambda: wanda_prune(W, sq_norm, sparsity)),
        ("magnitude", lambda: magnitude_prune(W, sparsity)),
    ):
        t0 = time.perf_counter()
        W_hat = fn()
        out[name] = (W_hat, time.perf_counter() - t0)
    return out


def rel_errors(W, W_hat, calls):
    """(weighted, uniform) relative reconstruction errors over calls [(X [n, d], alpha)]."""
    D = (W - W_hat).float()
    num_w = num_u = den_w = den_u = 0.0
    for X, a in calls:
        e, r = float((X @ D.T).square().sum()), float((X @ W.T).square().sum())
        num_w, den_w, num_u, den_u = num_w + a * e, den_w + a * r, num_u + e, den_u + r
    return num_w / den_w, num_u / den_u


class Capture:
    """Keeps every call's input (flattened) and alpha; also the weighted/uniform Hessians."""

    def __init__(self, d):
        self.calls, self.Hw, self.Hu = [], HessianStat(d), HessianStat(d)

    def update(self, x, alpha=1.0):
        self.calls.append((x.reshape(-1, x.shape[-1]).float().clone(), alpha))
        self.Hw.update(x, alpha)
        self.Hu.update(x, 1.0)

    def nbytes(self):
        return 0


def digits_pipeline():
    """The shipped digits checkpoint (edm.digits.loader), else the random-init architecture."""
    from edm.digits.components import build_components, default_config
    from edm.digits.loader import DigitsLoader
    from edm.digits.pipeline import DigitsPipeline
    from edm.errors import MissingWeightsError

    try:
        loader = DigitsLoader()
        return loader.load("digits", "fp32", "cpu"), f"trained ({loader.checkpoint.name})"
    except MissingWeightsError:
        pipe = DigitsPipeline(**build_components(default_config("small")))
        pipe.set_progress_bar_config(disable=True)
        return pipe, "RANDOM-INIT (no trained weights found)"


def bench_digits(steps: int, n_prompts: int) -> tuple[dict, str]:
    from edm.families import adapter

    pipe, label = digits_pipeline()
    den = adapter(pipe).denoiser(pipe)
    layers = [l for u in adapter(pipe).linear_units(den) for l in u]
    settings = CalibSettings(n_prompts, steps, 1.5, 16, 16, n_prompts, 24432)

    def weight(i, T):
        return float(timestep_weights("log_decrease", T)[i])

    cal = collect_stats(
        pipe,
        layers,
        lambda n, m: Capture(m.in_features),
        digit_items(0, n_prompts),
        settings,
        weight,
    )
    held = collect_stats(
        pipe,
        layers,
        lambda n, m: Capture(m.in_features),
        digit_items(1000, n_prompts),
        settings,
        weight,
    )
    rows = {
        k: {"w": [], "u": [], "t": 0.0} for k in ("obs_diff", "sparsegpt", "wanda", "magnitude")
    }
    for name, mod in layers:
        st, ev = cal.stats[name], held.stats[name]
        W = mod.weight.detach().float()
        for k, (W_hat, sec) in solve_all(W, st.Hw.H, st.Hu.H, torch.diagonal(st.Hw.H) / 2).items():
            ew, eu = rel_errors(W, W_hat, ev.calls)
            rows[k]["w"].append(ew), rows[k]["u"].append(eu)
            rows[k]["t"] += sec
    return (
        rows,
        (
            f"digits model, {label}: {len(layers)} linears, {n_prompts} calib prompts x {steps} "
            f"steps, evaluated on {n_prompts} held-out prompts"
        ),
    )


def _drifting(g, mix, scales, n):
    d = mix.shape[0]
    return (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)) * scales


def bench_random(shapes, steps: int, seeds: int) -> tuple[dict, str]:
    rows = {
        k: {"w": [], "u": [], "t": 0.0} for k in ("obs_diff", "sparsegpt", "wanda", "magnitude")
    }
    alphas = timestep_weights("log_decrease", steps)
    for rows_out, d in shapes:
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            base = torch.randn(d, d, generator=g) / d**0.5
            drift = torch.randn(d, d, generator=g) / d**0.5
            scales = torch.exp(torch.randn(d, generator=g))
            W = torch.randn(rows_out, d, generator=g)
            n = max(2 * d // steps, 64)
            # the input covariance drifts with the step, as activations do along sampling
            cal, ev = (
                [
                    (_drifting(g, base + (t / steps) * drift, scales, n), float(alphas[t]))
                    for t in range(steps)
                ]
                for _ in range(2)
            )
            Hw, Hu = HessianStat(d), HessianStat(d)
            for X, a in cal:
                Hw.update(X.unsqueeze(0), a)
                Hu.update(X.unsqueeze(0), 1.0)
            for k, (W_hat, sec) in solve_all(W, Hw.H, Hu.H, torch.diagonal(Hw.H) / 2).items():
                ew, eu = rel_errors(W, W_hat, ev)
                rows[k]["w"].append(ew), rows[k]["u"].append(eu)
                rows[k]["t"] += sec
    return (
        rows,
        (
            f"random correlated inputs, shapes {shapes}, {steps} drifting steps, {seeds} seeds, "
            "held-out samples"
        ),
    )


def table_a(rows: dict) -> str:
    mag_w = sum(rows["magnitude"]["w"]) / len(rows["magnitude"]["w"])
    mag_u = sum(rows["magnitude"]["u"]) / len(rows["magnitude"]["u"])
    obs_t = rows["obs_diff"]["t"]
    lines = [
        (
            "| method | rel. error (log-dec weighted) | vs magnitude | rel. error (uniform) "
            "| vs magnitude | solve s | vs OBS-Diff time |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        w, u = sum(r["w"]) / len(r["w"]), sum(r["u"]) / len(r["u"])
        lines.append(
            f"| {k} | {w:.4f} | {w / mag_w:.3f} | {u:.4f} | {u / mag_u:.3f} | {r['t']:.3f} "
            f"| {r['t'] / obs_t:.3f} |"
        )
    return "\n".join(lines)


# ---- (b) packages memory ---------------------------------------------------------------------
def mid_sd3():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from edm.models.tiny import tiny_sd3

    base = tiny_sd3()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=6,
            attention_head_dim=64,
            num_attention_heads=8,
            joint_attention_dim=96,
            caption_projection_dim=512,
            pooled_projection_dim=64,
            pos_embed_max_size=64,
        ).eval()
    pipe = StableDiffusion3Pipeline(**{**base.components, "transformer": tr})
    pipe.edm_family = "sd3"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def packages_child(groups: int, steps: int, n_prompts: int) -> None:
    """Run in a fresh process: OBS-Diff 50 % on the mid-size MMDiT; print the report as JSON."""
    from edm.methods.weight import OBSDiff

    torch.set_num_threads(1)
    pipe = mid_sd3()
    gen = {
        "num_inference_steps": steps,
        "guidance_scale": 7.0,
        "height": 32,
        "width": 32,
        "batch_size": 2,
    }
    items = [PromptItem(i, f"a photo of object {i}", seed=i) for i in range(n_prompts)]
    rep = OBSDiff(sparsity=0.5, num_groups=groups).apply(
        pipe, ApplyContext(family="sd3", gen=gen, calib=Prompts(items))
    )
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(json.dumps({"groups": groups, "params": params, **rep.metrics}))


def bench_packages(steps: int, n_prompts: int) -> list[dict]:
    out = []
    for groups in (1, 4):
        res = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-packages",
                str(groups),
                "--steps",
                str(steps),
                "--prompts",
                str(n_prompts),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--child-packages", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child_packages is not None:
        return packages_child(args.child_packages, args.steps, args.prompts)

    t0 = time.perf_counter()
    parts = [
        "# bench_obs — solver error/time and module-package memory\n",
        f"Command: `python experiments/bench_obs.py {' '.join(sys.argv[1:])}`  ",
        (
            f"torch {torch.__version__}, 1 intra-op thread, "
            f"{platform.processor() or platform.machine()}, Python {platform.python_version()}. "
            "Sparsity 50 % unstructured; blocksize 128, percdamp 0.01.\n"
        ),
    ]
    rows, desc = bench_digits(args.steps, args.prompts)
    parts += ["## (a1) " + desc, "", table_a(rows), ""]
    rows, desc = bench_random([(256, 256), (512, 1024), (512, 2048)], args.steps, args.seeds)
    parts += ["## (a2) " + desc, "", table_a(rows), ""]
    pk = bench_packages(3, 2)
    one, four = pk
    parts += [
        (
            "## (b) OBS-Diff 50 %, 1 vs 4 module packages: SD3-shaped MMDiT, 6 blocks, width "
            f"512, {one['params'] / 1e6:.1f} M params (random weights), 2 prompts x 3 steps, "
            "32x32, CFG 7"
        ),
        "",
        "| packages | Hessians alive at once (MB) | process peak RSS (GB) | calib s | solve s |",
        "|---|---|---|---|---|",
    ]
    for r in pk:
        parts.append(
            f"| {int(r['groups'])} | {r['stats_peak_mb']:.1f} | {r['peak_mem_gb']:.3f} | "
            f"{r['calib_seconds']:.2f} | {r['solve_seconds']:.2f} |"
        )
    parts += [
        "",
        (
            "Ratios 4 vs 1 packages: Hessian memory "
            f"{four['stats_peak_mb'] / one['stats_peak_mb']:.3f}, "
            f"peak RSS {four['peak_mem_gb'] / one['peak_mem_gb']:.3f}, "
            f"calibration time {four['calib_seconds'] / one['calib_seconds']:.2f}x."
        ),
        f"\nTotal benchmark wall time {time.perf_counter() - t0:.0f} s.",
    ]
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
