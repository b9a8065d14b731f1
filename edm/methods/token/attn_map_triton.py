"""The head-mean attention map of a pruning layer as two Triton kernels (CUDA path, issue 15).

On a GPU the explicit map of :func:`edm.methods.token.attn_map.attention_with_map` is bound by
memory traffic, not FLOPs: every head's probabilities ``[h, N, N]`` (fp32) are written by the
``Q K^T`` product, read and written again by the softmax and read once more by the head sum and
``P V`` -- at SD-XL 1024^2 (N = 4096, 10 heads) ~2.7 GB per image and layer, which is why AT-EDM
reached only 0.67 of its FLOPs ratio on an H100 (``experiments/results/bench_token_gpu.md``).
Here the per-head probabilities never leave the chip:

1. ``row_lse_kernel`` -- the row log-sum-exp of every head (an online softmax over key blocks,
   flash-attention's forward without ``V``);
2. ``head_sum_kernel`` -- one ``[BM, BN]`` block of ``sum_h exp(q_h k_h^T * scale - lse_h)``
   per program, heads summed in registers: the map is written once, ``B N^2`` floats.

The layer's output comes from fused SDPA (flash) instead of ``P V``, and G-WPR / the refill argmax
read the map as before. Cost: ``Q K^T`` twice (FLOPs ~2x the map's product, tensor cores) against
~``4 h`` fewer bytes of map traffic. Only the ``mean`` head reduction (the paper's) has a kernel;
``rms`` needs the per-head maps and stays on the PyTorch path.

Correctness is checked on CPU by Triton's interpreter (``TRITON_INTERPRET=1``, which must be set
before this module is imported): ``tests/test_attn_map_triton.py`` compares the map with the
PyTorch path on identical inputs, including head dims that are no power of two (SD1.5's 40),
ragged blocks and MMDiT / FLUX mapped sub-ranges.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from edm.errors import ConfigError

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAP_KERNELS = ("auto", "torch", "triton")
_CHECKED: set[str] = set()  # devices whose kernels passed the start-up self-check
INDEX_LIMIT = 2**31 - 1  # the kernels' offsets are int32: larger batches are split


@functools.cache
def _triton():
    """``(triton, (lse kernel, map kernel))`` on first use; ``None`` where triton is missing."""
    try:
        import triton

        from edm.methods.token import attn_map_kernels as K
    except ImportError:
        return None
    return triton, (K.row_lse_kernel, K.head_sum_kernel)


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: CUDA with triton, or any device under the
    interpreter (tests)."""
    return (device.type == "cuda" or INTERPRET) and _triton() is not None


def head_mean_map(q: torch.Tensor, k: torch.Tensor, map_from: int = 0, n_map: int | None = None,
                  block: int = 64) -> torch.Tensor:
    """``A [B, mq, mk]`` (float32): the head mean of ``softmax(q k^T / sqrt(d))`` over the mapped
    queries and keys ``[map_from, map_from + n_map)``, rows renormalised to 1 when keys are cut --
    exactly :func:`~edm.methods.token.attn_map.attention_with_map`'s map with ``head_reduce="mean"``.

    Args:
        q, k: ``[B, h, N, d]`` (any strides; fp16 / bf16 / fp32; self-attention: the same ``N``).
        block: query / key block of one program (16 or more; 64 suits Hopper and Ampere).
    """
    if _triton() is None:
        raise RuntimeError("head_mean_map needs triton (installed with CUDA builds of torch).")
    triton, (row_lse_kernel, head_sum_kernel) = _triton()
    b, h, nq, d = q.shape
    nk = k.shape[2]
    mq = nq - map_from if n_map is None else min(n_map, nq - map_from)
    mk = nk - map_from if n_map is None else min(n_map, nk - map_from)
    per = max(1, INDEX_LIMIT // max(1, mq * mk, h * max(nq, nk) * d))
    if b > per:  # the kernels index with int32: split the batch so no offset overflows
        return torch.cat([head_mean_map(q[i : i + per], k[i : i + per], map_from, n_map, block)
                          for i in range(0, b, per)])
    lse = torch.empty(b, h, mq, dtype=torch.float32, device=q.device)
    A = torch.empty(b, mq, mk, dtype=torch.float32, device=q.device)
    bd = max(16, triton.next_power_of_2(d))
    meta = dict(BM=block, BN=block, BD=bd, IEEE=q.dtype == torch.float32)
    scale = 1.0 / math.sqrt(d)
    strides = (*q.stride(), *k.stride())
    row_lse_kernel[(b * h, triton.cdiv(mq, block))](q, k, lse, h, mq, nk, d, map_from, scale,
                                                 *strides, **meta)
    head_sum_kernel[(b, triton.cdiv(mq, block), triton.cdiv(mk, block))](
        q, k, lse, A, h, mq, mk, d, map_from, scale, *strides, **meta)
    return A / A.sum(-1, keepdim=True) if mk < nk else A / h


def resolve(kernel: str, head_reduce: str, device: torch.device) -> str:
    """``method.map_kernel`` -> ``"torch"`` | ``"triton"`` for a run on ``device``.

    ``auto``: the kernels on CUDA for the ``mean`` head reduction, PyTorch otherwise. Before the
    first triton run on a device the kernels are compiled and compared with the PyTorch path on a
    small input, so a GPU or Triton build they do not work on fails here, with the fix, before any
    image is generated (not silently: the knob says which path ran)."""
    if kernel not in MAP_KERNELS:
        raise ConfigError("method.map_kernel", f"unknown value {kernel!r}.", MAP_KERNELS)
    device = torch.device(device)
    if kernel == "torch" or (kernel == "auto" and (head_reduce != "mean" or not available(device))):
        return "torch"
    if head_reduce != "mean":
        raise ConfigError("method.map_kernel", "triton computes the head-mean map only; "
                          "head_reduce=rms needs per-head maps: use map_kernel=torch or auto.")
    if not available(device):
        raise ConfigError("method.map_kernel", f"triton needs a CUDA device and triton installed "
                          f"(this run: {device}, triton {'missing' if _triton() is None else 'found'});"
                          " use map_kernel=auto or torch.")
    key = str(device)
    if key not in _CHECKED:
        _self_check(device)
        _CHECKED.add(key)
    return "triton"


def _self_check(device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, 80, 40, generator=g).to(device) for _ in range(2))
    try:
        got = head_mean_map(q, k)
    except Exception as e:  # noqa: BLE001 - any compile / launch failure has the same fix
        raise ConfigError("method.map_kernel", f"the triton map kernels failed on {device} "
                          f"({type(e).__name__}: {e}); use method.map_kernel=torch.") from e
    ref = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)
    err = (got - ref).abs().max().item()
    if not err <= 1e-3 * ref.abs().max().item():
        raise ConfigError("method.map_kernel", f"the triton map differs from the PyTorch map on "
                          f"{device} (max error {err:.3g}); use method.map_kernel=torch.")
