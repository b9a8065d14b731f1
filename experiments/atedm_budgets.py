"""AT-EDM settings that meet the paper's SD-XL FLOPs budgets (spec §1.3, §1.7).

FLOPs are counted on the architecture-faithful full-size SD-XL UNet on the meta device
(``edm.models.archs``), one batch-1 call at 1024² (the paper's "Ave. FLOPs/step" per image), with
``edm.eval.flops`` conventions (2 FLOPs per multiply-add; the explicit attention maps and the
G-WPR mat-vecs of the pruning layers included). DSAP makes FLOPs step-dependent: the average
over a trajectory is ``(tau * F_early + (T - tau) * F_late) / T``, which this script gets from
the first ``tau + 1`` calls of a ``T``-step trajectory.

Paper budgets (TFLOPs/step): dense 6.7; AT-EDM-a..d 2.9 / 3.6 / 4.1 / 4.5; AT-EDM (= c) 4.1;
AT-EDM† (no pruning at the 64x64 level, = d) 4.5.

    python experiments/atedm_budgets.py            # count the committed conf/method/at_edm*.yaml
    python experiments/atedm_budgets.py --search   # also bisect prune_ratio for budgets a and b
    python experiments/atedm_budgets.py --mmdit    # also SD3-medium / SD3.5-medium at 1024²

MMDiT (beyond the paper): one batch-1 call at 1024² (4096 image + 333 text tokens), image tokens
pruned after the listed joint blocks and refilled after the last one; DSAP exempts no MMDiT block,
so without ``early_prune_ratio`` the FLOPs do not depend on the step.
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import torch
import yaml

from edm.eval.flops import meta_denoiser_flops
from edm.methods.base import ApplyContext
from edm.methods.token.atedm import ATEDM
from edm.models import archs

PAPER_T = {
    "dense": 6.7,
    "at_edm": 4.1,
    "at_edm_a": 2.9,
    "at_edm_b": 3.6,
    "at_edm_c": 4.1,
    "at_edm_d": 4.5,
}
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
_SKIP = {"_target_", "defaults", "name", "tag"}


def sdxl_meta(height: int = 1024, width: int = 1024, batch: int = 1):
    """A pipe-like holder of the meta SD-XL UNet (with a scheduler) and one call's inputs."""
    from diffusers import EulerDiscreteScheduler

    unet = archs.build_denoiser("sdxl")
    inputs = archs.sample_inputs("sdxl", height=height, width=width, batch_size=batch)
    pipe = types.SimpleNamespace(unet=unet, scheduler=EulerDiscreteScheduler(), edm_family="sdxl")
    return pipe, inputs


def avg_step_flops(pipe, inputs, method: ATEDM | None, num_steps: int = 10,
                   cfg_batch: bool = False) -> float:
    """Average FLOPs per denoising step of a ``num_steps`` trajectory with ``method`` applied;
    ``cfg_batch``: the inputs are a classifier-free-guidance pair (AT-EDM maps one half)."""
    if method is None:
        return float(meta_denoiser_flops(pipe.unet, inputs))
    pipe.scheduler.set_timesteps(num_steps)
    tau = min(method.dsap.tau(num_steps), num_steps - 1) if method.dsap.enabled else 0
    method.apply(pipe, ApplyContext(family="sdxl", meta_cfg_batch=cfg_batch))
    try:
        flops = []
        for t in pipe.scheduler.timesteps[: tau + 1]:  # the step tracker counts these calls
            call = dict(inputs, timestep=torch.full_like(inputs["timestep"], float(t)))
            flops.append(float(meta_denoiser_flops(pipe.unet, call)))
    finally:
        method.remove(pipe)
    return (sum(flops[:tau]) + (num_steps - tau) * flops[tau]) / num_steps


def committed(name: str) -> dict:
    """Constructor arguments of ``conf/method/<name>.yaml`` (``defaults: [at_edm]`` merged)."""
    node = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    base = {} if name == "at_edm" else yaml.safe_load((CONF / "at_edm.yaml").read_text())
    base.update(node)
    args = {k: v for k, v in base.items() if k not in _SKIP}
    args["seed"] = 0  # ${seed} interpolation, irrelevant for FLOPs
    return args


def find_ratio(pipe, inputs, target_t: float, base: dict, iters: int = 10) -> tuple[float, float]:
    """Bisect ``prune_ratio`` (FLOPs fall monotonically with it) to the budget."""
    lo, hi, best = 0.0, 0.99, (0.0, float("inf"))
    for _ in range(iters):
        mid = round((lo + hi) / 2, 3)
        f = avg_step_flops(pipe, inputs, ATEDM(**{**base, "prune_ratio": mid})) / 1e12
        if abs(f - target_t) < abs(best[1] - target_t):
            best = (mid, f)
        lo, hi = (mid, hi) if f > target_t else (lo, mid)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--search", action="store_true", help="bisect prune_ratio for budgets a, b")
    ap.add_argument("--mmdit", action="store_true", help="also count SD3/SD3.5-medium settings")
    args = ap.parse_args()
    pipe, inputs = sdxl_meta()
    print(
        "| config | paper TFLOPs | prune_ratio | downsamples | DSAP | ours TFLOPs | rel. error |"
    )
    print("|---|---|---|---|---|---|---|")
    dense = avg_step_flops(pipe, inputs, None) / 1e12
    print(f"| dense | 6.7 | - | - | - | {dense:.3f} | {dense / 6.7 - 1:+.1%} |")
    for name in ("at_edm", "at_edm_a", "at_edm_b", "at_edm_c", "at_edm_d"):
        kw = committed(name)
        m = ATEDM(**kw)
        f = avg_step_flops(pipe, inputs, m) / 1e12
        print(
            f"| {name} | {PAPER_T[name]} | {m.prune_ratio} | {m.downsamples} | {m.dsap!r} | "
            f"{f:.3f} | {f / PAPER_T[name] - 1:+.1%} |"
        )
    if args.search:
        base = committed("at_edm")
        for name, target in (("a", 2.9), ("b", 3.6)):
            ratio, f = find_ratio(pipe, inputs, target, base)
            print(f"search {name}: prune_ratio={ratio} -> {f:.3f} T (paper {target})")
    if args.mmdit:
        mmdit_table()


MMDIT_SETTINGS = (
    {"prune_ratio": 0.63, "mmdit_prune_after": [0]},  # the at_edm.yaml defaults
    {"prune_ratio": 0.63, "mmdit_prune_after": [3]},
    {"prune_ratio": 0.5, "mmdit_prune_after": [0]},
    {"prune_ratio": 0.4, "mmdit_prune_after": [0, 8]},
)


def mmdit_table() -> None:
    """TFLOPs of one batch-1 1024² call of SD3-medium / SD3.5-medium with AT-EDM."""
    print("\n| model | setting | TFLOPs/call | FLOPs ratio |\n|---|---|---|---|")
    for arch in ("sd3_medium", "sd35_medium"):
        tr = archs.build_denoiser(arch)
        inputs = archs.sample_inputs(arch, batch_size=1)
        pipe = types.SimpleNamespace(transformer=tr, scheduler=None, edm_family="sd3")
        dense = meta_denoiser_flops(tr, inputs) / 1e12
        print(f"| {arch} | dense | {dense:.3f} | 1.000 |")
        for kw in MMDIT_SETTINGS:
            m = ATEDM(**kw)
            m.apply(pipe, ApplyContext(family="sd3"))
            try:
                f = meta_denoiser_flops(tr, inputs) / 1e12
            finally:
                m.remove(pipe)
            print(f"| {arch} | {kw} | {f:.3f} | {dense / f:.3f} |")


if __name__ == "__main__":
    main()
