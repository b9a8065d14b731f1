"""OBS-Diff Table 5: wall-clock of one SD3.5-Large MMDiT block, dense vs 2:4 vs structured.

One ``JointTransformerBlock`` with SD3.5-Large's sizes (``edm.models.archs``: 38 heads of 64,
width 2432, FFN 4x, RMS q/k norm) and random weights, called on batch x (image + text) tokens
(paper: RTX 4090, batch 4, 1024² = 4096 image tokens; SD3's prompt is 77 CLIP + 256 T5 = 333
text tokens). Configurations, all built from the same dense block:

* **dense**;
* **2:4**: every MHA / FFN linear of the block (the layers OBS-Diff prunes) 2:4-masked by
  magnitude and stored as ``torch.sparse.to_sparse_semi_structured`` (CUDA, fp16/bf16 only:
  elsewhere the row says "not run"). Which weights go does not change the time;
* **structured 15-30 %**: heads and FFN neurons removed with ``edm.methods.weight.slicing``
  (``num_to_prune`` per attention / FFN, chosen by L1 norm, then physically sliced), i.e. the
  block a structured OBS-Diff or L1 pruning leaves: OBS-Diff only changes the kept values.

Timing: warm-up calls first, then ``--repeats`` rounds that call every configuration once, in
alternating order (so drift hits all alike), threads pinned; the median and the fastest call per
configuration and their ratios to dense are measured in this one process. ``--clock cpu`` times
the calling thread's CPU time instead of wall-clock (one CPU thread only), which other jobs on a
shared machine do not inflate.

    python experiments/bench_table5.py                                     # the paper's size (GPU)
    OMP_NUM_THREADS=1 python experiments/bench_table5.py --device cpu --threads 1 --clock cpu \\
        --batch 1 --image-tokens 1024 --repeats 5 --warmup 1 --out experiments/results/bench_table5.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from edm.eval.flops import count_params
from edm.methods.weight.l1 import l1_scores
from edm.methods.weight.masks import nm_mask
from edm.methods.weight.slicing import mask_target, slice_targets, structured_targets
from edm.models.archs import arch_spec

PAPER = {"dense": (14.36, None), "2:4": (11.71, 1.23), "structured 15%": (13.96, 1.03),
         "structured 20%": (11.95, 1.20), "structured 25%": (11.17, 1.29),
         "structured 30%": (10.99, 1.31)}  # ms, speed-up (spec §2.8 Table 5)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NO_SPARSE = "not run: needs CUDA semi-structured kernels"


class OneBlock(nn.Module):
    """The block where ``edm.families``' MMDiT adapter looks for it (``transformer_blocks``)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([block])


def sd35_block(heads: int | None = None, seed: int = 0) -> nn.Module:
    """A middle SD3.5-Large block (``context_pre_only=False``); ``heads`` shrinks it for tests."""
    from diffusers.models.attention import JointTransformerBlock

    cfg = arch_spec("sd35_large").config
    h, d = heads or cfg["num_attention_heads"], cfg["attention_head_dim"]
    torch.manual_seed(seed)
    return JointTransformerBlock(dim=h * d, num_attention_heads=h, attention_head_dim=d,
                                 context_pre_only=False, qk_norm=cfg["qk_norm"]).eval()


def targets_of(block: nn.Module):
    return structured_targets(OneBlock(block), "sd3", exclude_first_last=False)


def structured(dense: nn.Module, ratio: float) -> nn.Module:
    block = copy.deepcopy(dense)
    targets = targets_of(block)
    for t in targets:
        mask_target(t, torch.argsort(l1_scores(t))[: t.num_to_prune(ratio)].tolist())
    slice_targets(targets)
    return block


def semi_structured(dense: nn.Module) -> nn.Module:
    """2:4 by magnitude on every target linear, stored in the sparse kernel's format (the
    conversion of ``method.export=semi_structured``)."""
    from edm.methods.weight.export import to_semi_structured

    block = copy.deepcopy(dense)
    lins = {id(m): m for t in targets_of(block)
            for m in [c for _, c in t.consumers] + [p for _, p, _ in t.producers]}
    with torch.no_grad():
        for lin in lins.values():
            lin.weight[nm_mask(lin.weight.abs().float(), 2, 4)] = 0
    out = to_semi_structured([(str(i), lin) for i, lin in enumerate(lins.values())])
    if out["skipped"]:
        raise RuntimeError(f"layers not converted: {out['skipped']}")
    return block


def build(args, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """``{name: block}`` to time and ``{name: reason}`` for rows that cannot run here."""
    dense = sd35_block(args.heads, args.seed).to(device=device, dtype=dtype)
    models, skipped = {"dense": dense}, {}
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            models["2:4"] = semi_structured(dense)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            skipped["2:4"] = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    else:
        skipped["2:4"] = NO_SPARSE
    for r in args.ratios:
        models[f"structured {r:.0%}"] = structured(dense, r)
    return models, skipped


def inputs(args, dim: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    x = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    return {"hidden_states": x(args.batch, args.image_tokens, dim),
            "encoder_hidden_states": x(args.batch, args.text_tokens, dim),
            "temb": x(args.batch, dim)}


def time_blocks(models: dict, kw: dict, repeats: int, warmup: int, device,
                clock=time.perf_counter) -> dict[str, list]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(**kw)
        sync()
        for r in range(repeats):
            for k in (list(models) if r % 2 == 0 else list(reversed(models))):
                sync()
                t0 = clock()
                models[k](**kw)
                sync()
                out[k].append((clock() - t0) * 1e3)
    return out


def report(args, models: dict, skipped: dict, times: dict, device, dtype) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    rows = ["dense", "2:4"] + [f"structured {r:.0%}" for r in args.ratios]
    lines = ["# OBS-Diff Table 5: one SD3.5-Large MMDiT block, time per call", "",
             f"`{args.command}`", "",
             f"Ours: {device.type} ({platform.processor() or platform.machine()}"
             + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
             + f"), {args.dtype}, {args.threads} thread(s), batch {args.batch}, "
             f"{args.image_tokens} image + {args.text_tokens} text tokens, "
             f"width {models['dense'].norm1.linear.in_features}; "
             + ("thread CPU time (time.thread_time), not wall-clock; " if args.clock == "cpu"
                else "wall-clock; ")
             + f"{args.warmup} warm-up call(s), "
             f"then {args.repeats} alternated rounds; median and fastest run per configuration, "
             f"ratios to dense measured in this process (on a shared machine other jobs only add "
             f"time, so the fastest runs are the steadier estimate). torch {torch.__version__}. "
             "Paper: RTX 4090, batch 4, 1024² (4096 image tokens), precision not stated.", "",
             ("| configuration | paper (ms) | paper speed-up | ours median (ms) | ours speed-up "
              "(median) | ours fastest (ms) | ours speed-up (fastest) | #params (M) | runs (ms) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for k in rows:
        p_ms, p_sp = PAPER.get(k, (None, None))
        paper = [f"{p_ms:.2f}" if p_ms else "–", f"{p_sp:.2f}x" if p_sp else "–"]
        if k in skipped or k not in med:
            ours = [skipped.get(k, "not run")] + ["–"] * 5
        else:
            # the packed 2:4 weights are not nn.Parameters count_params can read
            params = f"{count_params(models[k]) / 1e6:.1f}" if k != "2:4" else "(2:4 packed)"
            ours = [f"{med[k]:.2f}", f"{med['dense'] / med[k]:.2f}x", f"{low[k]:.2f}",
                    f"{low['dense'] / low[k]:.2f}x", params,
                    ", ".join(f"{t:.1f}" for t in times[k])]
        lines.append(f"| {k} | " + " | ".join(paper + ours) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES),
                    help="default: fp16 on CUDA (the sparse kernels need fp16/bf16), fp32 on CPU")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (pinned)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--image-tokens", type=int, default=4096, help="4096 = 1024² (VAE 8x, patch 2)")
    ap.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 tokens")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.15, 0.2, 0.25, 0.3])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--heads", type=int, default=None, help="fewer heads: a narrower block (tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: this thread's CPU time (CPU, --threads 1 only), which other jobs on "
                         "a shared machine do not inflate; wall: wall-clock (the paper's)")
    ap.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = ap.parse_args(argv)
    args.command = " ".join(["python experiments/bench_table5.py",
                             *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and (device.type != "cpu" or args.threads != 1):
        # other threads' (or the GPU's) work would not be counted
        ap.error("--clock cpu needs --device cpu --threads 1")
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[args.dtype]
    models, skipped = build(args, device, dtype)
    dim = models["dense"].norm1.linear.in_features
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    times = time_blocks(models, inputs(args, dim, device, dtype), args.repeats, args.warmup,
                        device, clock)
    md = report(args, models, skipped, times, device, dtype)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
    print(md)
    return md


if __name__ == "__main__":
    main()
