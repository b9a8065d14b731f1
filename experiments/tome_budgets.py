"""ToMe merge ratios that meet the AT-EDM paper's SD-XL FLOPs budgets a-d (spec §1.7).

FLOPs are counted on the architecture-faithful full-size SD-XL UNet on the meta device
(``edm.models.archs``), one batch-1 call at 1024² (the paper's "FLOPs/step" per image), with
``edm.eval.flops`` conventions (2 FLOPs per multiply-add; ToMe's own matching matmul included).

Merging only self-attention cannot reach the budgets (the minimum, ratio 0.75 on every level, is
about 5.4 T), so the budget configs merge self-attention, cross-attention queries and the MLP on
both attention levels (``max_downsample=4``) and tune the ratio. Budget a needs the maximum ratio.

    python experiments/tome_budgets.py            # bisect the ratios, print the table
    python experiments/tome_budgets.py --check    # only count the committed conf/method/tome_*.yaml
"""

from __future__ import annotations

import argparse

from edm import configs
from edm.eval.flops import bisect_to_flops, meta_pipe, trajectory_flops
from edm.methods.token.tome import ToMe

BUDGETS_T = {"a": 2.9, "b": 3.6, "c": 4.1, "d": 4.6}  # paper: ToMe-a..d, Ave. TFLOPs/step
SETTING = {"max_downsample": 4, "merge_attn": True, "merge_crossattn": True, "merge_mlp": True}


def sdxl_meta():
    """The meta SD-XL UNet in a pipe-like holder and one batch-1 1024² call's inputs."""
    return meta_pipe("sdxl")


def tome_flops(pipe, inputs, method: ToMe | None = None, **tome_kwargs) -> float:
    """FLOPs per call of ``method`` (or ``ToMe(**tome_kwargs)``; dense when neither), averaged
    over a trajectory (the budget configs merge at a constant ratio: no DSAP)."""
    if method is None and tome_kwargs:
        method = ToMe(**tome_kwargs)
    return trajectory_flops(pipe, inputs, method)


def find_ratio(pipe, inputs, target_t: float, iters: int = 9) -> tuple[float, float]:
    """Bisect the merge ratio (FLOPs fall monotonically with it) to the budget."""
    return bisect_to_flops(lambda r: tome_flops(pipe, inputs, ratio=r, **SETTING),
                           target_t * 1e12, 0.0, 0.75, iters=iters)


def committed(name: str) -> ToMe:
    """The method ``python run.py model=sdxl method=tome_<name>`` applies (composed by Hydra)."""
    return configs.method("model=sdxl", f"method=tome_{name}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--check", action="store_true", help="count the committed configs only")
    args = ap.parse_args()
    pipe, inputs = sdxl_meta()
    dense = tome_flops(pipe, inputs)
    print(f"dense SD-XL 1024^2: {dense / 1e12:.3f} TFLOPs per call (paper 6.7)")
    print("| budget | paper T | ratio | ours T | rel. error |")
    print("|---|---|---|---|---|")
    for name, target in BUDGETS_T.items():
        if args.check:
            m = committed(name)
            ratio, flops = m.ratio, tome_flops(pipe, inputs, m)
        else:
            ratio, flops = find_ratio(pipe, inputs, target)
        print(
            f"| {name} | {target} | {ratio} | {flops / 1e12:.3f} | {flops / 1e12 / target - 1:+.1%} |"
        )


if __name__ == "__main__":
    main()
