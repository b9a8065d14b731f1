"""FLOPs per denoising step of token-method settings on the embedded digits model.

Used to pick ToMe settings that match AT-EDM's FLOPs in ``conf/experiment/digits_token_quality.yaml``
(FLOPs do not depend on the weights, so any digits checkpoint of the same preset gives the same
numbers). Each setting is a list of Hydra overrides composed exactly as ``run.py`` would:

    python experiments/digits_token_flops.py                       # the default grid
    python experiments/digits_token_flops.py "method=tome method.ratio=0.5 method.merge_mlp=true"

``--match`` fits the ``{r}`` of ``--template`` (on a 0.01 grid in [0, 0.75], by bisection: FLOPs fall
as the ratio grows) to each reference setting's FLOPs, e.g. ToMe against AT-EDM on the layouts model:

    python experiments/digits_token_flops.py --extra model=layouts \
        --match "method=at_edm method.prune_ratio=0.5" "method=at_edm method.prune_ratio=0.7"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_GRID = (
    ["method=none"]
    + [f"method=at_edm method.assignment=attention method.prune_ratio={r} method.dsap.enabled={d}"
       for d in ("true", "false") for r in (0.3, 0.4, 0.5, 0.6, 0.7)]
    + [f"method=tome method.max_downsample=2 method.ratio={r} method.merge_crossattn={c} method.merge_mlp={m}"
       for c, m in (("false", "false"), ("true", "true"))
       for r in (0.3, 0.4, 0.5, 0.6, 0.7, 0.75)]
)


def gflops(overrides: list[str]) -> float:
    """``perf/gflops_per_step`` (CFG batch included, averaged over the trajectory) of one setting."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from edm import configs, perf
    from edm.data.prompts import assign_seeds
    from edm.methods.base import ApplyContext
    from edm.runner import build_method

    cfg = configs.compose("logger=none", "data.num_prompts=1", *overrides)
    method = build_method(cfg)
    pipe = instantiate(cfg.model.loader).load(family=cfg.model.family, dtype="fp32", device="cpu")
    gen = OmegaConf.to_container(cfg.gen, resolve=True)
    item = assign_seeds(instantiate(cfg.data).load(), int(cfg.seed))[0]
    method.apply(pipe, ApplyContext(family=cfg.model.family, device=torch.device("cpu"), gen=gen,
                                    seed=int(cfg.seed)))
    return perf.flops_per_step(pipe, item, gen, cfg.model.limits.guidance)["gflops_per_step"]


def fit_ratio(target: float, flops, lo: int = 0, hi: int = 75) -> tuple[float, float]:
    """The ratio on a 0.01 grid whose ``flops(ratio)`` is nearest ``target`` (``flops`` decreasing)."""
    cache = {}

    def f(i):
        if i not in cache:
            cache[i] = flops(i / 100)
        return cache[i]

    while hi - lo > 1:                      # invariant: f(lo) >= target >= f(hi), or an end is best
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if f(mid) >= target else (lo, mid)
    best = min((lo, hi), key=lambda i: abs(f(i) - target))
    return best / 100, f(best)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*", help="space-separated overrides per setting (quoted)")
    ap.add_argument("--extra", default="", help="overrides added to every setting, e.g. a checkpoint")
    ap.add_argument("--match", action="store_true", help="fit --template's {r} to each setting's FLOPs")
    ap.add_argument("--template", default="method=tome method.max_downsample=2 method.ratio={r}")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.match:
        for s in args.settings:
            target = gflops(s.split() + args.extra.split())
            r, g = fit_ratio(target, lambda r: gflops(args.template.format(r=r).split() + args.extra.split()))
            print(f"{args.template.format(r=r)}: {g:.5f} GFLOPs/step vs {target:.5f} "
                  f"({100 * (g / target - 1):+.2f} %)  {s}", flush=True)
        return
    dense = None
    for s in args.settings or DEFAULT_GRID:
        g = gflops(s.split() + args.extra.split())
        dense = g if dense is None and s == "method=none" else dense
        rel = f"  ({g / dense:.3f} x dense)" if dense else ""
        print(f"{g:.5f} GFLOPs/step{rel}  {s}", flush=True)


if __name__ == "__main__":
    main()
