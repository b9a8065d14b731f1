"""Token pruning wall-clock on CPU: dense vs AT-EDM vs ToMe at matched FLOPs (issue 4, item 7).

Full-size denoisers (``edm.models.archs``, random weights), 512², batch 2 (one CFG step of one
image: equal latent halves, different text halves), one UNet call per row and round. All rows of a
model share one model in one process; rows are alternated (the order rotates every round) so a
load change on the shared machine hits every row alike. Speed-up = median over rounds of
``t_dense / t_row`` from the same round, for wall-clock time and for the thread's CPU time
(``time.thread_time``: with one thread on an oversubscribed machine it excludes waiting for a
core, the stabler of the two there). FLOPs: the same architecture on the meta device, same shapes
(a late step: DSAP off). Fused SDPA stays on wherever no map is needed.

Overhead breakdown (AT-EDM rows, ``profile=True``): ``map`` is the whole mapped ``attn1`` call
of the pruning layers (projections, explicit map + output in one pass); ``fused`` is the same
layers' ``attn1`` calls in the dense row (fused SDPA), so ``map - fused`` is the cost of
materialising the maps; ``gwpr``, ``mask`` (top-k + refill sources), ``gather`` and ``refill``
are the rest. Target: AT-EDM speed-up >= 0.9 x its FLOPs ratio.

    python experiments/bench_token.py --archs sd15 --rounds 3 \
        --out experiments/results/bench_token.md
    python experiments/bench_token.py --archs sdxl --rounds 2 --append \
        --out experiments/results/bench_token.md

``dense_compiled``: the dense model with its ``forward`` compiled once before the rounds
(``edm.compiling.compile_forward``, ``--compile-mode``, ``--freezing``: on for CPU by default),
alternated with the other rows, which run under ``set_stance("force_eager")``; every row also
gets its speed-up against it. Method rows stay eager (each apply would recompile).

Rows: ``ROWS[name] = factory(bench) -> Method | None`` (``None`` = dense). A factory may use
``bench.match(make, lo, hi)`` to find the parameter at which ``make(x)`` has the FLOPs of the
``at_edm`` row (bisection on the meta model).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch

from edm.eval.flops import bisect_to_flops, meta_pipe, trajectory_flops
from edm.families import adapter
from edm.methods.base import ApplyContext
from edm.methods.token.atedm import ATEDM
from edm.models import archs
from edm.perf import cuda_clock
from edm.compiling import compile_forward

NO_DSAP = {"enabled": False}  # one call = a late denoising step


class Bench:
    """One architecture at one shape: meta copy for FLOPs, CPU copy for timing."""

    def __init__(self, arch: str, size: int, batch: int, dtype: torch.dtype, device: str = "cpu"):
        self.arch, self.size, self.batch, self.dtype = arch, size, batch, dtype
        self.device = device
        self.family = archs.arch_spec(arch).family
        self.meta_pipe, self.meta_inputs = meta_pipe(arch, size, size, batch)
        self.meta = adapter(self.family).denoiser(self.meta_pipe)
        self.flops_cache: dict[str, float] = {}
        self.target: float | None = None  # FLOPs of the at_edm row

    def pipe(self, denoiser):
        attr = "unet" if archs.arch_spec(self.arch).is_unet else "transformer"
        return types.SimpleNamespace(**{attr: denoiser}, scheduler=None, edm_family=self.family)

    def flops(self, method) -> float:
        # one late-step call (the rows run without DSAP); the timed inputs are a CFG batch
        # (equal latent halves), which on meta must be declared
        return trajectory_flops(self.meta_pipe, self.meta_inputs, method, num_steps=1,
                                cfg_batch=True)

    def match(
        self, make: Callable[[float], object], lo: float, hi: float, iters: int = 7
    ) -> float:
        """Parameter in [lo, hi] whose method has the FLOPs of the ``at_edm`` row (monotone)."""
        assert self.target is not None, "the at_edm row must come first"
        x, _ = bisect_to_flops(lambda r: self.flops(make(r)), self.target, lo, hi, iters=iters)
        return x


def _profile(bench: Bench) -> str | bool:
    # GPU: no per-phase timers, their syncs would slow the timed call (see profile_token.py)
    return False if bench.device == "cuda" else "cpu"


def _atedm(**kw):
    return lambda bench: ATEDM(dsap=NO_DSAP, profile=_profile(bench), **kw)


def _tome(bench: Bench):
    from edm.methods.token.tome import ToMe

    # merge everything on every level: attention-only ToMe cannot reach AT-EDM's FLOPs
    def make(r):
        return ToMe(ratio=r, max_downsample=8, merge_crossattn=True, merge_mlp=True, seed=0)

    return make(bench.match(make, 0.0, 0.75))


class _TomesdRow:
    """The ``tomesd`` package as a bench row (``apply``/``remove`` like an edm Method).

    tomesd reads the latent size from the UNet's first positional argument, so this bench's
    keyword call would raise inside it: its size hook is replaced by one that also reads
    ``sample`` by name. diffusers' ``HookRegistry.remove_hook`` leaves the bound ``forward`` as an
    instance attribute on modules other rows hooked, which would shadow tomesd's class swap
    (tomesd would silently run dense), so those attributes are dropped first.
    """

    def __init__(self, **kw):
        self.kw, self.ratio = kw, kw["ratio"]

    def apply(self, pipe, ctx) -> None:
        import tomesd

        unet = pipe.unet
        for mod in unet.modules():
            registry = getattr(mod, "_diffusers_hook", None)
            if registry is not None and not registry.hooks:
                mod.__dict__.pop("forward", None)
        tomesd.apply_patch(unet, **self.kw)
        info = unet._tome_info
        for handle in info["hooks"]:
            handle.remove()

        def size(module, args, kwargs):
            x = args[0] if args else kwargs["sample"]
            info["size"] = (x.shape[2], x.shape[3])

        info["hooks"] = [unet.register_forward_pre_hook(size, with_kwargs=True)]

    def remove(self, pipe) -> None:
        import tomesd

        tomesd.remove_patch(pipe.unet)


def _tome_sd_make(bench: Bench):
    from edm.methods.token.tome import ToMe

    # SDXL has no attention at downsample 1 (ToMe raises there, tomesd would do nothing)
    kw = {"ratio": 0.5, "max_downsample": 2 if bench.family == "sdxl" else 1}
    return lambda edm: ToMe(seed=0, **kw) if edm else _TomesdRow(**kw)


# Rows in order; the first AT-EDM row sets the FLOPs that ToMe matches.
COMPILED = "dense_compiled"
ROWS: dict[str, Callable[[Bench], object]] = {
    "dense": lambda bench: None,
    COMPILED: lambda bench: None,  # dense, torch.compile'd forward (see the docstring)
    "at_edm": _atedm(),
    # SD1.5 (after_self_attn): the output from P·V of the map instead of fused SDPA on the kept
    # rows (map_output=kept_fused, the default there); identical to at_edm on SDXL (after_ffn)
    "at_edm_reuse": _atedm(map_output="reuse"),
    # the chunked PyTorch map the CUDA triton kernels replace (on CPU: = at_edm)
    "at_edm_torchmap": _atedm(map_kernel="torch"),
    # "dagger": no pruning at the finest attention level, where maps are largest (SD1.5 512²: 64x64)
    "at_edm_dagger": lambda bench: ATEDM(
        dsap=NO_DSAP,
        profile=_profile(bench),
        downsamples=[2, 4, 8] if bench.family != "sdxl" else [4],
    ),
    # --- ToMe rows ---
    "tome": _tome,
    # tomesd's own setting (attention only, ratio 0.5, finest attention level), edm vs package
    "tome_sd": lambda bench: _tome_sd_make(bench)(edm=True),
    "tomesd": lambda bench: _tome_sd_make(bench)(edm=False),
}


def cpu_inputs(arch: str, size: int, batch: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    inp = archs.sample_inputs(arch, size, size, batch, device="cpu", dtype=dtype)
    half = batch // 2
    key = "sample" if "sample" in inp else "hidden_states"  # UNet | MMDiT
    x = torch.randn(inp[key][:half].shape, generator=g).to(dtype)
    inp[key] = torch.cat([x, x])  # a CFG batch: equal latent halves
    inp["encoder_hidden_states"] = torch.randn(inp["encoder_hidden_states"].shape, generator=g).to(
        dtype
    )
    inp["timestep"] = torch.full((batch,), 500.0)
    return inp


def _to(x, dev: str):
    """Move the tensors of a (nested) inputs dict, e.g. SDXL's ``added_cond_kwargs``."""
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    return x.to(dev) if torch.is_tensor(x) else x


def _sdpa_timers(denoiser, layer_names: list[str], acc: dict[str, float], clock=time.thread_time):
    """Forward pre/post hooks adding the fused attn1 time of each layer to ``acc[name]``."""
    modules = dict(denoiser.named_modules())
    handles, start = [], {}
    for name in layer_names:
        attn = modules.get(f"{name}.attn1") or modules[f"{name}.attn"]  # UNet | MMDiT

        def pre(mod, args, name=name):
            start[name] = clock()

        def post(mod, args, out, name=name):
            acc[name] = acc.get(name, 0.0) + clock() - start[name]

        handles += [attn.register_forward_pre_hook(pre), attn.register_forward_hook(post)]
    return handles


@torch.no_grad()
def bench_model(arch: str, rows: list[str], args) -> list[str]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = args.device
    bench = Bench(arch, args.size, args.batch, dtype, dev)
    # CPU: this thread's CPU time (robust to other load); GPU: wall clock after a sync
    clock = cuda_clock if dev == "cuda" else time.thread_time
    methods, flops = {}, {}
    for row in rows:
        methods[row] = ROWS[row](bench)
        flops[row] = bench.flops(methods[row])
        if row == "at_edm":
            bench.target = flops[row]
        print(f"[{arch}] {row}: {flops[row] / 1e12:.3f} TFLOPs/call", flush=True)
    denoiser = archs.build_denoiser(arch, device=dev, dtype=dtype)
    pipe = bench.pipe(denoiser)
    inputs = _to(cpu_inputs(arch, args.size, args.batch, dtype), dev)
    ctx = ApplyContext(family=bench.family, dtype=dtype)
    mapped: list[str] = []
    for row in rows:  # which layers AT-EDM maps (the dense row times their SDPA)
        if isinstance(methods[row], ATEDM):
            rep = methods[row].apply(pipe, ctx)
            mapped = sorted(set(mapped) | set(rep.details["pruning_layers"]))
            methods[row].remove(pipe)
    phases = {r: {} for r in rows}  # AT-EDM's per-phase seconds, summed over the timed rounds
    wall = {r: [] for r in rows}
    cpu = {r: [] for r in rows}  # this thread's CPU time: excludes time descheduled by other load
    sdpa_acc: dict[str, float] = {}
    outputs = {}
    compiled = COMPILED in rows
    eager = (lambda: torch.compiler.set_stance("force_eager")) if compiled else \
        contextlib.nullcontext
    with eager():
        denoiser(**inputs)  # warm-up, untimed
    if compiled:
        compile_forward(denoiser, mode=args.compile_mode, freezing=args.freezing)
        t0 = time.perf_counter()
        denoiser(**inputs)  # compiles (untimed)
        print(f"[{arch}] compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        denoiser(**inputs)
    for rnd in range(args.rounds):
        order = rows[rnd % len(rows) :] + rows[: rnd % len(rows)]
        for row in order:
            m = methods[row]
            handles = []
            if m is None:
                if dev != "cuda" and row != COMPILED:  # per-layer timing needs syncs on CUDA
                    handles = _sdpa_timers(denoiser, mapped, sdpa_acc, clock)
            else:
                m.apply(pipe, ctx)
            if dev == "cuda":
                torch.cuda.synchronize()
            with contextlib.nullcontext() if row == COMPILED else eager():
                t0, c0 = time.perf_counter(), clock()
                out = denoiser(**inputs)[0]
                c1 = clock()
            wall[row].append(time.perf_counter() - t0)
            cpu[row].append(c1 - c0)
            outputs.setdefault(row, out)
            for h in handles:
                h.remove()
            if m is not None:
                for k, v in m.run_metrics().items():
                    if k.startswith("time_"):
                        key = k[len("time_"):-len("_s")]
                        phases[row][key] = phases[row].get(key, 0.0) + v
                m.remove(pipe)
            print(f"[{arch}] round {rnd} {row}: {wall[row][-1]:.2f} s wall", flush=True)
    where = f"{args.threads} thread(s)"
    if dev == "cuda":
        where = f"{torch.cuda.get_device_name()}, synchronized wall clock in both time columns"
    lines = [
        f"\n### {arch} at {args.size}², batch {args.batch}, {args.dtype}, {where}, "
        f"{args.rounds} rounds\n",
        "| row | TFLOPs/call | FLOPs ratio | wall s (median) | wall speed-up | / FLOPs ratio | "
        "CPU s (median) | CPU speed-up | / FLOPs ratio | " + "CPU speed-up vs compiled | " * compiled
        + "changes output | setting |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * compiled,
    ]
    for row in rows:
        ratio_f = flops["dense"] / flops[row]
        sp_w = statistics.median(d / t for d, t in zip(wall["dense"], wall[row]))
        sp_c = statistics.median(d / t for d, t in zip(cpu["dense"], cpu[row]))
        changed = "-" if row == "dense" else str(not torch.equal(outputs[row], outputs["dense"]))
        m = methods[row]
        setting = "-" if m is None else _describe(m)
        vs = ""
        if compiled:
            vs = f"{statistics.median(d / t for d, t in zip(cpu[COMPILED], cpu[row])):.3f} | "
        if row == COMPILED:
            setting = f"torch.compile mode={args.compile_mode}, freezing={args.freezing}"
        lines.append(
            f"| {row} | {flops[row] / 1e12:.3f} | {ratio_f:.3f} | "
            f"{statistics.median(wall[row]):.2f} | {sp_w:.3f} | {sp_w / ratio_f:.2f} | "
            f"{statistics.median(cpu[row]):.2f} | {sp_c:.3f} | {sp_c / ratio_f:.2f} | "
            f"{vs}{changed} | {setting} |"
        )
    if dev == "cuda":
        lines += [
            "",
            "Per-phase overhead is not timed on CUDA (see experiments/profile_token.py).",
        ]
        del denoiser
        return lines
    lines += [
        "",
        "Overhead per call (AT-EDM rows, CPU seconds; `map` = mapped attn1 calls of the "
        "pruning layers, `fused` = the same calls in the dense row, fused SDPA):",
        "",
        "| row | map | fused (dense) | map - fused | gwpr | mask | gather | refill | total extra |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = methods[row]
        if not isinstance(m, ATEDM):
            continue
        t = {k: v / args.rounds for k, v in phases[row].items()}
        mine = m.apply(pipe, ctx).details["pruning_layers"]
        m.remove(pipe)
        sdpa = sum(sdpa_acc.get(name, 0.0) for name in mine) / args.rounds
        extra = (
            t.get("map", 0) - sdpa + sum(t.get(k, 0) for k in ("gwpr", "mask", "gather", "refill"))
        )
        lines.append(
            f"| {row} | {t.get('map', 0):.3f} | {sdpa:.3f} | {t.get('map', 0) - sdpa:.3f} | "
            f"{t.get('gwpr', 0):.3f} | {t.get('mask', 0):.3f} | {t.get('gather', 0):.3f} | "
            f"{t.get('refill', 0):.3f} | {extra:.3f} |"
        )
    del denoiser
    return lines


def _describe(m) -> str:
    if isinstance(m, ATEDM):
        out = m.map_output
        if out == "auto":
            out = "kept_fused" if m.resolved_point == "after_self_attn" else "reuse"
        return (
            f"ratio {m.prune_ratio}, {m.resolved_point}, layers {m.prune_after_layers}, "
            f"downsamples {m.downsamples or 'all'}, output {out}"
        )
    return f"{type(m).__name__} ratio {getattr(m, 'ratio', '?')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--archs", default="sd15,sdxl")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of the dense_compiled row")
    ap.add_argument("--freezing", default=None, choices=["on", "off"],
                    help="inductor freezing of dense_compiled (default: on for CPU, as compile.freezing)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--append", action="store_true", help="append to --out (one file, two runs)")
    args = ap.parse_args()
    args.freezing = args.device == "cpu" if args.freezing is None else args.freezing == "on"
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what a GPU user runs (fp32 rows only)
    rows = [r for r in args.rows.split(",") if r]
    assert rows[0] == "dense" and "at_edm" in rows, "rows must start with dense and include at_edm"
    t0 = time.time()
    report = [] if args.append else [
        f"# Token pruning benchmark ({'GPU' if args.device == 'cuda' else 'CPU'})", "",
        f"torch {torch.__version__}, random weights; see the docstring of "
        "experiments/bench_token.py for the protocol."]
    report += ["", "```", "python " + " ".join(sys.argv), "```"]
    for arch in args.archs.split(","):
        report += bench_model(arch, rows, args)
    report += ["", f"Total wall time {time.time() - t0:.0f} s."]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a" if args.append else "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
