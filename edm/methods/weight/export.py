"""``method.export``: store 2:4-pruned linears in a format whose kernels skip the zeros.

A pruning mask alone runs the same dense GEMMs. ``semi_structured`` turns every 2:4-pruned
``nn.Linear`` weight into PyTorch's ``SparseSemiStructuredTensor``
(``torch.sparse.to_sparse_semi_structured``: cuSPARSELt where PyTorch has it, else CUTLASS),
whose ``F.linear`` runs NVIDIA's sparse tensor-core kernels (Ampere and newer; Hopper support
is reported shaky upstream, pytorch#132009 -- measure before trusting a speed-up). Those
kernels exist only on CUDA, for fp16/bf16 here, and for weights whose shape is a multiple of
the kernels' tile (32 rows x 64 columns covers both backends); other layers stay dense masked
and are listed in the report.

Pure checks (:func:`check_export`, :func:`is_two_four`, :func:`eligible`) are CPU-testable;
:func:`to_semi_structured` needs CUDA (tests/test_gpu.py compares it with the masked model).
"""

from __future__ import annotations

import torch
from torch import nn

from edm.errors import ConfigError

EXPORTS = (None, "semi_structured")
DTYPES = (torch.float16, torch.bfloat16)
TILE = (32, 64)  # (rows, columns) multiple that both CUTLASS and cuSPARSELt accept in fp16/bf16


def check_export(export, pattern: str, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """``ConfigError`` for an export the run cannot do (before anything is loaded)."""
    if export not in EXPORTS:
        raise ConfigError("method.export", f"unknown export {export!r}.", EXPORTS)
    if export is None:
        return
    if pattern != "2:4":
        raise ConfigError("method.export", f"semi_structured stores 2:4 sparsity; "
                          f"method.pattern is {pattern!r}. Use method.pattern=2:4.", ["2:4"])
    if device is not None and device.type != "cuda":
        raise ConfigError("method.export", f"semi_structured kernels run on CUDA only; this run "
                          f"is on {device.type}. Use device=cuda or method.export=null.",
                          [None])
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("method.export", f"semi_structured kernels take fp16/bf16 weights; "
                          f"model.dtype is {dtype}. Use model.dtype=fp16 or bf16.",
                          ["fp16", "bf16"])


def is_two_four(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs (the layout the kernels store;
    anything else would be silently dropped by the compression)."""
    if w.shape[-1] % 4:
        return False
    return bool(((w.reshape(-1, 4) != 0).sum(-1) <= 2).all())


def eligible(module: nn.Module) -> str | None:
    """``None`` if ``module``'s weight can be stored semi-structured, else why not."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not nn.Linear"
    rows, cols = module.weight.shape
    if rows % TILE[0] or cols % TILE[1]:
        return f"weight {rows}x{cols} is not a multiple of {TILE[0]}x{TILE[1]}"
    if not is_two_four(module.weight.detach()):
        return "weight is not 2:4 sparse"
    return None


def to_semi_structured(layers: list[tuple[str, nn.Module]]) -> dict:
    """Replace each eligible layer's weight by its ``SparseSemiStructuredTensor`` (in place).
    Returns ``{"converted": [names], "skipped": {name: reason}}``."""
    from torch.sparse import to_sparse_semi_structured

    converted, skipped = [], {}
    for name, module in layers:
        why = eligible(module)
        if why is None and module.weight.device.type != "cuda":
            why = f"weight is on {module.weight.device.type}, not CUDA"
        if why is None and module.weight.dtype not in DTYPES:
            why = f"weight dtype {module.weight.dtype} is not fp16/bf16"
        if why is not None:
            skipped[name] = why
            continue
        sparse = to_sparse_semi_structured(module.weight.detach())
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return {"converted": converted, "skipped": skipped}
