"""Where a token-pruned denoiser call spends its time: torch.profiler, dense vs one method.

    python experiments/profile_token.py --device cuda --dtype bf16 --arch sd15 --size 512
    python experiments/profile_token.py --arch sdxl --size 1024 --method tome

Prints the top operators by device (CUDA) or CPU self time for the dense call and the method's
call (random weights, CFG batch of 2, DSAP off), after one warm-up call of each.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from bench_token import NO_DSAP, Bench, _to, cpu_inputs
from torch.profiler import ProfilerActivity, profile

from edm.methods.base import ApplyContext
from edm.methods.token.atedm import ATEDM
from edm.methods.token.tome import ToMe
from edm.models import archs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--method", default="at_edm", choices=["at_edm", "tome"])
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument(
        "--python", action="store_true", help="cProfile (Python-side launch cost) instead"
    )
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bench = Bench(args.arch, args.size, args.batch, dtype, args.device)
    den = archs.build_denoiser(args.arch, device=args.device, dtype=dtype)
    pipe = bench.pipe(den)
    inputs = _to(cpu_inputs(args.arch, args.size, args.batch, dtype), args.device)
    method = ATEDM(dsap=NO_DSAP) if args.method == "at_edm" else ToMe(ratio=0.5, seed=0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    for label in ("dense", args.method):
        if label != "dense":
            method.apply(pipe, ApplyContext(family=bench.family, dtype=dtype))
        with torch.no_grad():
            den(**inputs)  # warm-up
            if args.python:
                cprof = cProfile.Profile()
                cprof.enable()
                den(**inputs)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                cprof.disable()
                print(f"\n===== {label} (Python) =====")
                pstats.Stats(cprof).sort_stats("tottime").print_stats(args.rows)
                continue
            with profile(activities=acts) as prof:
                den(**inputs)
                if args.device == "cuda":
                    torch.cuda.synchronize()
        print(f"\n===== {label} =====")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
