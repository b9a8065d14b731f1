"""ToMe (edm) vs the ``tomesd`` package at the same ratio: wall-clock of one UNet call on CPU.

Full-size SD1.5 UNet (``edm.models.archs``, random weights) at 512² (64x64 latent), batch 2 (one
CFG step of one image), tomesd's defaults (``max_downsample=1``, attention-only merging). One
model is shared by all rows; the rows are alternated (rotated order each round) so that a load
change on the machine hits every row alike, and the median per row is reported. Before timing, the
script checks that both ToMe rows change the output and agree bit for bit with each other
(same RNG fork, same merge).

    python experiments/bench_tome.py --threads 1 --rounds 3 --dtype fp32
    python experiments/bench_tome.py --threads 1 --rounds 3 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

from edm.methods.base import ApplyContext
from edm.methods.token.tome import ToMe
from edm.models import archs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _clear_instance_forward(module: torch.nn.Module) -> None:
    # diffusers' HookRegistry.remove_hook leaves the original bound ``forward`` as an *instance*
    # attribute; it would shadow tomesd's class swap (tomesd would silently run dense).
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and not registry.hooks:
            m.__dict__.pop("forward", None)


class Rows:
    """Install/remove one benchmark row on a shared UNet."""

    def __init__(self, unet, ratio: float):
        self.unet, self.ratio = unet, ratio
        self.pipe = types.SimpleNamespace(unet=unet, scheduler=None, edm_family="sd15")
        self.tome = ToMe(ratio=ratio, seed=None)  # seed=None: tomesd's RNG fork, for the check

    def install(self, row: str) -> None:
        if row == "tomesd":
            import tomesd

            tomesd.apply_patch(self.unet, ratio=self.ratio)
        elif row == "edm_tome":
            self.tome.apply(self.pipe, ApplyContext(family="sd15"))

    def remove(self, row: str) -> None:
        if row == "tomesd":
            import tomesd

            tomesd.remove_patch(self.unet)
        elif row == "edm_tome":
            self.tome.remove(self.pipe)
            _clear_instance_forward(self.unet)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    unet = archs.build_denoiser("sd15", device="cpu", dtype=dtype)
    inputs = archs.sample_inputs(
        "sd15", args.size, args.size, batch_size=2, device="cpu", dtype=dtype
    )
    g = torch.Generator().manual_seed(0)
    for k in ("sample", "encoder_hidden_states"):
        inputs[k] = torch.randn(inputs[k].shape, generator=g).to(dtype)
    call = (
        inputs["sample"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
    )  # tomesd: positional
    rows = Rows(unet, args.ratio)
    names = ["dense", "tomesd", "edm_tome"]

    outs = {}
    for row in names:  # warm-up + correctness check
        rows.install(row)
        torch.manual_seed(0)
        outs[row] = unet(*call).sample
        rows.remove(row)
    assert not torch.equal(outs["tomesd"], outs["dense"]), "tomesd patched nothing"
    assert torch.equal(outs["edm_tome"], outs["tomesd"]), "edm ToMe differs from tomesd"

    wall = {row: [] for row in names}
    cpu = {row: [] for row in names}
    for r in range(args.rounds):
        order = names[r % 3 :] + names[: r % 3]
        for row in order:
            rows.install(row)
            torch.manual_seed(0)
            t0, c0 = time.perf_counter(), time.process_time()
            unet(*call)
            wall[row].append(time.perf_counter() - t0)
            cpu[row].append(time.process_time() - c0)
            rows.remove(row)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in cpu.items()), flush=True)
    print(
        f"\nSD1.5 UNet {args.size}² batch 2, {args.dtype}, {args.threads} thread(s), "
        f"ratio {args.ratio}, median of {args.rounds} alternated rounds (CPU = process time, "
        "robust to other load on the machine)"
    )
    print("| row | wall s / call | CPU s / call | CPU vs dense | CPU runs |")
    print("|---|---|---|---|---|")
    dense = statistics.median(cpu["dense"])
    for row in names:
        w, c = statistics.median(wall[row]), statistics.median(cpu[row])
        runs = " ".join(f"{t:.2f}" for t in cpu[row])
        print(f"| {row} | {w:.2f} | {c:.2f} | {dense / c:.2f}x | {runs} |")
    kernel_table(unet, args, dtype)


def kernel_table(unet, args, dtype, reps: int = 15) -> None:
    """Matching + merge + unmerge alone, for one full-resolution layer's input (tomesd vs edm)."""
    from tomesd.merge import bipartite_soft_matching_random2d

    from edm.methods.token.tome_kernel import bipartite_merge

    side = args.size // 8
    n, c = side * side, unet.config.block_out_channels[0]
    x = torch.randn(2, n, c).to(dtype)
    r = int(n * args.ratio)

    def ref():
        m, u = bipartite_soft_matching_random2d(
            x, side, side, 2, 2, r, generator=torch.Generator()
        )
        return u(m(x))

    def ours():
        m, u = bipartite_merge(x, side, side, r, generator=torch.Generator())
        return u(m(x))

    cpu = {"tomesd": [], "edm_tome": []}
    for i in range(reps):
        for name, fn in (("tomesd", ref), ("edm_tome", ours))[:: 1 if i % 2 else -1]:
            c0 = time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
    print(
        f"\nmatching + merge + unmerge of one layer input [2, {n}, {c}] ({args.dtype}), "
        f"median CPU ms of {reps}"
    )
    print("| kernel | CPU ms |")
    print("|---|---|")
    for name, ts in cpu.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} |")


if __name__ == "__main__":
    main()
