"""Efficiency metrics every run reports: parameters, sparsity, FLOPs per step, latency, memory."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time

import torch
from torch import nn

log = logging.getLogger(__name__)


def is_semi_structured(p: torch.Tensor) -> bool:
    """A weight stored as ``torch.sparse.SparseSemiStructuredTensor`` (``method.export``)."""
    from torch.sparse import SparseSemiStructuredTensor

    return isinstance(p, SparseSemiStructuredTensor)


def _dense(p: torch.Tensor) -> torch.Tensor:
    return p.to_dense() if is_semi_structured(p) else p


def param_stats(module: nn.Module) -> dict[str, float]:
    """Total parameters, non-zero parameters and zero fraction of Linear/Conv weights
    (semi-structured weights count as the dense matrices they store)."""
    total = sum(p.numel() for p in module.parameters())
    nonzero = sum(int(torch.count_nonzero(_dense(p))) for p in module.parameters())
    w_total = w_zero = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w_total += m.weight.numel()
            w_zero += m.weight.numel() - int(torch.count_nonzero(_dense(m.weight)))
    return {
        "params_m": total / 1e6,
        "params_b": total / 1e9,
        "nonzero_params_m": nonzero / 1e6,
        "weight_sparsity": (w_zero / w_total) if w_total else 0.0,
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return rss * scale / 2**30


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory of the run's device since the last :func:`reset_peak_memory`, in GiB, and
    what was measured: the CUDA allocator's peak, else the process's peak resident set size
    (which is never reset: it covers the whole process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return _peak_rss_gb(), "process_peak_rss"


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """The same keys on every device: ``peak_mem_gb`` (:func:`peak_memory`: device memory on
    CUDA, peak RSS on CPU) and ``peak_rss_gb`` (the process's host memory)."""
    return {"peak_mem_gb": peak_memory(device)[0], "peak_rss_gb": _peak_rss_gb()}


def flops_per_step(pipe, item, gen: dict, guidance: str = "cfg") -> dict[str, float]:
    """Average denoiser FLOPs per denoising step for one image (CFG batch included), measured by
    running the pipeline once under ``torch.utils.flop_counter`` (step-dependent methods such as
    DSAP are averaged over the real trajectory)."""
    from edm.eval import flops as F  # written alongside the model zoo

    kwargs = dict(
        prompt=[item.prompt],
        num_inference_steps=int(gen["num_inference_steps"]),
        guidance_scale=float(gen["guidance_scale"]),
        height=int(gen["height"]),
        width=int(gen["width"]),
        generator=[torch.Generator("cpu").manual_seed(int(item.seed))],
        output_type="pt",
    )
    kwargs.update(gen.get("call_kwargs") or {})
    per_call = F.measure_denoiser_flops(pipe, **kwargs)
    if not per_call:
        return {}
    avg = sum(per_call) / len(per_call)
    # CFG pipelines batch the two halves into one call (diffusers: CFG on when guidance_scale >
    # 1); the papers quote FLOPs per denoiser forward of ONE sample, hence the division.
    # ``guidance`` is the model's ``limits.guidance``: a distilled model (FLUX.1-dev) takes the
    # scale as an embedding input and runs one sample per call.
    cfg_batch = 2 if guidance == "cfg" and float(gen["guidance_scale"]) > 1.0 else 1
    # per image: the whole trajectory of one sample, so fewer steps and caches (cheap steps)
    # compare on one number
    return {"gflops_per_step": avg / 1e9, "tflops_per_forward": avg / cfg_batch / 1e12,
            "denoiser_calls": float(len(per_call)),
            "tflops_per_image": sum(per_call) / cfg_batch / 1e12}


def cuda_clock() -> float:
    """Wall clock after ``torch.cuda.synchronize()``: GPU work is asynchronous, so this times
    what was queued so far (adds a sync per reading: keep it out of timed benchmark calls)."""
    torch.cuda.synchronize()
    return time.perf_counter()


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time, "cuda": cuda_clock}


class PhaseTimer:
    """Accumulates seconds per named phase (``with timer("map"): ...``); ``clock`` is a key of
    :data:`CLOCKS` or ``None`` (no timing, no overhead: every phase is a null context)."""

    def __init__(self, clock: str | None = None):
        if clock is not None and clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r}; known: {', '.join(CLOCKS)}")
        self.clock = CLOCKS[clock] if clock else None
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        return _Phase(self, name) if self.clock is not None else contextlib.nullcontext()

    def metrics(self) -> dict[str, float]:
        """``time_<phase>_s`` for every phase timed so far."""
        return {f"time_{k}_s": v for k, v in self.totals.items()}


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.t0 = self.timer.clock()

    def __exit__(self, *exc):
        t = self.timer
        t.totals[self.name] = t.totals.get(self.name, 0.0) + t.clock() - self.t0
