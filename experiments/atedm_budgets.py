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

from edm import configs
from edm.eval.flops import bisect_to_flops, meta_pipe, trajectory_flops
from edm.methods.token.atedm import ATEDM

PAPER_T = {
    "dense": 6.7,
    "at_edm": 4.1,
    "at_edm_a": 2.9,
    "at_edm_b": 3.6,
    "at_edm_c": 4.1,
    "at_edm_d": 4.5,
}


def committed(name: str) -> ATEDM:
    """The method ``python run.py model=sdxl method=<name>`` applies (composed by Hydra)."""
    return configs.method("model=sdxl", f"method={name}")


def find_ratio(pipe, inputs, target_t: float) -> tuple[float, float]:
    """``prune_ratio`` of the ``at_edm`` setting that meets the budget (FLOPs fall with it)."""
    def tflops(r: float) -> float:
        m = configs.method("model=sdxl", "method=at_edm", f"method.prune_ratio={r}")
        return trajectory_flops(pipe, inputs, m) / 1e12

    return bisect_to_flops(tflops, target_t, 0.0, 0.99, iters=10, digits=3)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--search", action="store_true", help="bisect prune_ratio for budgets a, b")
    ap.add_argument("--mmdit", action="store_true", help="also count SD3/SD3.5-medium settings")
    args = ap.parse_args()
    pipe, inputs = meta_pipe("sdxl")
    print(
        "| config | paper TFLOPs | prune_ratio | downsamples | DSAP | ours TFLOPs | rel. error |"
    )
    print("|---|---|---|---|---|---|---|")
    dense = trajectory_flops(pipe, inputs, None) / 1e12
    print(f"| dense | 6.7 | - | - | - | {dense:.3f} | {dense / 6.7 - 1:+.1%} |")
    for name in ("at_edm", "at_edm_a", "at_edm_b", "at_edm_c", "at_edm_d"):
        m = committed(name)
        f = trajectory_flops(pipe, inputs, m) / 1e12
        print(
            f"| {name} | {PAPER_T[name]} | {m.prune_ratio} | {m.downsamples} | {m.dsap!r} | "
            f"{f:.3f} | {f / PAPER_T[name] - 1:+.1%} |"
        )
    if args.search:
        for name, target in (("a", 2.9), ("b", 3.6)):
            ratio, f = find_ratio(pipe, inputs, target)
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
        pipe, inputs = meta_pipe(arch)
        dense = trajectory_flops(pipe, inputs, None) / 1e12
        print(f"| {arch} | dense | {dense:.3f} | 1.000 |")
        for kw in MMDIT_SETTINGS:  # DSAP exempts no MMDiT block: one call is the trajectory
            f = trajectory_flops(pipe, inputs, ATEDM(**kw, dsap={"enabled": False})) / 1e12
            print(f"| {arch} | {kw} | {f:.3f} | {dense / f:.3f} |")


if __name__ == "__main__":
    main()
