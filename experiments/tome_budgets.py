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
import types
from pathlib import Path

import yaml

from edm.eval.flops import meta_denoiser_flops
from edm.methods.base import ApplyContext
from edm.methods.token.tome import ToMe
from edm.models import archs

BUDGETS_T = {"a": 2.9, "b": 3.6, "c": 4.1, "d": 4.6}  # paper: ToMe-a..d, Ave. TFLOPs/step
SETTING = {"max_downsample": 4, "merge_attn": True, "merge_crossattn": True, "merge_mlp": True}
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


def sdxl_meta(height: int = 1024, width: int = 1024):
    """The meta SD-XL UNet, a pipe-like holder for ``Method.apply`` and one call's inputs."""
    unet = archs.build_denoiser("sdxl")
    inputs = archs.sample_inputs("sdxl", height=height, width=width, batch_size=1)
    inputs["timestep"] = (
        500  # a python number: the step tracker reads it (a meta tensor has no value)
    )
    return types.SimpleNamespace(unet=unet, scheduler=None, edm_family="sdxl"), inputs


def tome_flops(pipe, inputs, **tome_kwargs) -> int:
    """FLOPs of one denoiser call with ``ToMe(**tome_kwargs)`` applied (dense when empty)."""
    if not tome_kwargs:
        return meta_denoiser_flops(pipe.unet, inputs)
    method = ToMe(**tome_kwargs)
    method.apply(pipe, ApplyContext(family="sdxl"))
    try:
        return meta_denoiser_flops(pipe.unet, inputs)
    finally:
        method.remove(pipe)


def find_ratio(pipe, inputs, target_t: float, iters: int = 9) -> tuple[float, int]:
    """Bisect the merge ratio (FLOPs fall monotonically with it) to the nearest count."""
    lo, hi = 0.0, 0.75
    best = (hi, tome_flops(pipe, inputs, ratio=hi, **SETTING))
    if best[1] >= target_t * 1e12:
        return best  # the budget is below what the maximum ratio reaches
    for _ in range(iters):
        mid = round((lo + hi) / 2, 4)
        f = tome_flops(pipe, inputs, ratio=mid, **SETTING)
        if abs(f - target_t * 1e12) < abs(best[1] - target_t * 1e12):
            best = (mid, f)
        lo, hi = (mid, hi) if f > target_t * 1e12 else (lo, mid)
    return best


def committed(name: str) -> dict:
    """The ToMe arguments of ``conf/method/tome_<name>.yaml`` (its ``defaults: [tome]`` merged)."""
    cfg = yaml.safe_load((CONF / "tome.yaml").read_text())
    cfg.update(
        {
            k: v
            for k, v in yaml.safe_load((CONF / f"tome_{name}.yaml").read_text()).items()
            if k != "defaults"
        }
    )
    return {
        k: cfg[k]
        for k in (
            "ratio",
            "max_downsample",
            "sx",
            "sy",
            "merge_attn",
            "merge_crossattn",
            "merge_mlp",
        )
    }


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
            kw = committed(name)
            ratio, flops = kw["ratio"], tome_flops(pipe, inputs, **kw)
        else:
            ratio, flops = find_ratio(pipe, inputs, target)
        print(
            f"| {name} | {target} | {ratio} | {flops / 1e12:.3f} | {flops / 1e12 / target - 1:+.1%} |"
        )


if __name__ == "__main__":
    main()
