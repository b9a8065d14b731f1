"""Structured OBS-Diff 30 % on the full-size SDXL UNet: parameters, TFLOPs, CPU wall-clock.

Compares with OBS-Diff Table 3 (SDXL, 30 %: 2.57 B -> 1.91 B parameters, 5.98 -> 4.70 TFLOPs).
Random weights (``edm.models.archs``), no calibration: after structured pruning the shapes depend
only on how many heads / neurons each module loses (``round(n * sparsity)``), not on which, so:

1. **Shapes.** The targets of ``edm.methods.weight.slicing`` are built on the meta-device SDXL.
   For one target of each class (FFN 640 / 1280 wide, heads of 10 / 20) the real structured OBS
   kernel runs on a random weight with a fake Hessian (low-rank + diagonal SPD) and is timed;
   every other target removes a seeded random choice of the same size (one FFN-1280 solve takes
   minutes on one CPU core, and SDXL has 60). Then everything is physically sliced.
2. **Counts.** Parameters, and FLOPs of one batch-1 call at 1024² with ``edm.eval.flops`` in
   the convention that reproduces the paper's dense 5.98 T (linears + convolutions, attention
   products excluded); the total with attention is printed too.
3. **Wall-clock.** One UNet call (batch 1, small resolution) of the dense and the sliced model on
   CPU, threads pinned, runs alternated (warm-up first), median reported. The sliced model
   shares every unpruned tensor with the dense one, so both fit in memory (bf16: ~8 GB).

    python experiments/bench_structured.py --threads 1 --rounds 3 --res 256 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from edm.eval.flops import count_params, flop_counter, split_flops
from edm.methods.weight import structured as K
from edm.methods.weight.slicing import slice_targets, structured_targets
from edm.models import archs

PAPER = {"params_dense": 2.57e9, "params_30": 1.91e9, "tflops_dense": 5.98, "tflops_30": 4.70}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fake_hessian(cols: int, g: torch.Generator) -> torch.Tensor:
    """Random SPD matrix with correlated inputs: rank-256 part plus a positive diagonal."""
    U = torch.randn(cols, 256, generator=g) / 16
    return U @ U.T + torch.diag(torch.rand(cols, generator=g) + 0.1)


def choose_pruned(targets, sparsity: float, seed: int, obs: bool = True) -> dict[str, float]:
    """Set ``target.pruned`` for every target; OBS for one target per class (timed)."""
    g = torch.Generator().manual_seed(seed)
    timed: dict[str, float] = {}
    for t in targets:
        k = t.num_to_prune(sparsity)
        cls = f"{t.kind}-{t.num_groups}x{t.group_size}"
        if obs and cls not in timed and k > 0:
            lin = t.consumers[0][1]
            W = torch.randn(lin.out_features, lin.in_features, generator=g) / lin.in_features**0.5
            H = fake_hessian(lin.in_features, g)
            t0 = time.perf_counter()
            res = K.obs_prune_structured(W, H, k, t.group_size)
            timed[cls] = time.perf_counter() - t0
            t.pruned = res.pruned.tolist()
        else:
            t.pruned = sorted(torch.randperm(t.num_groups, generator=g)[:k].tolist())
    return timed


def flops(model: nn.Module, inputs: dict) -> dict[str, float]:
    with flop_counter() as counter, torch.no_grad():
        model(**inputs)
    s = split_flops(counter)
    return {"tflops_no_attn": s["linear_conv"] / 1e12, "tflops_total": s["total"] / 1e12}


def shared_copy(dense: nn.Module, arch: str) -> nn.Module:
    """A second module tree holding the *same* parameter/buffer objects as ``dense``."""
    twin = archs.build_denoiser(arch, device="meta")
    src = dict(dense.named_modules())
    for name, mod in twin.named_modules():
        mod._parameters = dict(src[name]._parameters)
        mod._buffers = dict(src[name]._buffers)
    return twin


def time_calls(models: dict[str, nn.Module], inputs: dict, rounds: int) -> dict[str, list[float]]:
    out = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up, untimed
            m(**inputs)
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for k in order:
                t0 = time.perf_counter()
                models[k](**inputs)
                out[k].append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="sdxl")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--res", type=int, default=256, help="pixels of the timed call (latent /8)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--no-obs", action="store_true", help="shapes only, no kernel timing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = archs.arch_spec(args.arch)

    print(f"## Structured OBS {args.sparsity:.0%} on {args.arch} (random weights)\n")
    meta_in = archs.sample_inputs(args.arch)  # native resolution (1024^2), batch 1
    rows = []
    for exclude in (True, False):
        model = archs.build_denoiser(args.arch, device="meta")
        dense = {"params": count_params(model), **flops(model, meta_in)}
        targets = structured_targets(model, spec.family, exclude_first_last=exclude)
        timed = choose_pruned(targets, args.sparsity, args.seed, obs=exclude and not args.no_obs)
        slice_targets(targets)
        pruned = {"params": count_params(model), **flops(model, meta_in)}
        rows.append((exclude, len(targets), dense, pruned, timed))

    print("| setting | targets | #params | TFLOPs (no attn) | TFLOPs (with attn) |")
    print("|---|---|---|---|---|")
    d = rows[0][2]
    print(f"| dense (measured) | - | {d['params'] / 1e9:.3f} B | {d['tflops_no_attn']:.3f} | "
          f"{d['tflops_total']:.3f} |")
    print(f"| dense (paper Tab. 3) | - | {PAPER['params_dense'] / 1e9:.2f} B | "
          f"{PAPER['tflops_dense']:.2f} | - |")
    for exclude, n, dense, pr, _ in rows:
        red = 1 - pr["tflops_no_attn"] / dense["tflops_no_attn"]
        print(f"| {args.sparsity:.0%}, first/last {'excluded' if exclude else 'included'} | {n} | "
              f"{pr['params'] / 1e9:.3f} B | {pr['tflops_no_attn']:.3f} (-{red:.2%}) | "
              f"{pr['tflops_total']:.3f} |")
    print(f"| 30 % (paper Tab. 3) | - | {PAPER['params_30'] / 1e9:.2f} B | "
          f"{PAPER['tflops_30']:.2f} (-21.40%) | - |")
    timed = rows[0][4]
    if timed:
        counts: dict[str, int] = {}
        for t in structured_targets(archs.build_denoiser(args.arch, device="meta"), spec.family):
            cls = f"{t.kind}-{t.num_groups}x{t.group_size}"
            counts[cls] = counts.get(cls, 0) + 1
        print(f"\nStructured OBS kernel (fake Hessian, {args.threads} thread(s)), one target per "
              "class; count = targets of the class with the paper's default block range:\n")
        print("| class (kind-groups x group size) | seconds / target | count | seconds, all |")
        print("|---|---|---|---|")
        for cls, sec in timed.items():
            print(f"| {cls} | {sec:.1f} | {counts.get(cls, 0)} | {sec * counts.get(cls, 0):.0f} |")
        est = sum(sec * counts.get(cls, 0) for cls, sec in timed.items())
        print(f"\nEstimated solve time for the whole UNet on this CPU: {est / 3600:.1f} h "
              "(calibration not included).")

    if args.skip_timing:
        return
    dtype = DTYPES[args.dtype]
    print(f"\n## CPU wall-clock, one UNet call, batch 1, {args.res}x{args.res}, {args.dtype}, "
          f"{args.threads} thread(s), {args.rounds} alternated rounds after warm-up\n")
    dense = archs.build_denoiser(args.arch, device="cpu", dtype=dtype, seed=args.seed)
    sliced = shared_copy(dense, args.arch)
    targets = structured_targets(sliced, spec.family)  # default: as the paper (UNet: all)
    choose_pruned(targets, args.sparsity, args.seed, obs=False)  # values do not matter for time
    slice_targets(targets)
    inputs = archs.sample_inputs(args.arch, args.res, args.res, device="cpu", dtype=dtype)
    with torch.no_grad():
        assert sliced(**inputs).sample.shape == dense(**inputs).sample.shape
    times = time_calls({"dense": dense, "sliced": sliced}, inputs, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("| model | #params | runs (s) | median (s) |")
    print("|---|---|---|---|")
    for k, m in (("dense", dense), ("sliced", sliced)):
        print(f"| {k} | {count_params(m) / 1e9:.3f} B | "
              f"{', '.join(f'{x:.2f}' for x in times[k])} | {med[k]:.2f} |")
    print(f"\nspeed-up dense/sliced: {med['dense'] / med['sliced']:.3f}x")


if __name__ == "__main__":
    main()
