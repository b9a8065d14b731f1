"""Random weights for full-size architectures built on the meta device (timing, never quality)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def materialize(module: nn.Module, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """Replace meta parameters by random ones on ``device`` (std ``1/sqrt(fan_in)``, norms = 1,
    biases std 0.02).

    Drawing 2.6 B normals takes minutes on one core, so weights are tiled from one block of
    ``_RANDOM_BLOCK`` (a prime, so rows of a matrix do not repeat) seeded normals: memory-bound
    copies. Good enough for timing (finite activations at a sane scale); never for quality.
    """
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(_RANDOM_BLOCK, generator=gen)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if p.dim() >= 2:
                scaled = (block * p[0].numel() ** -0.5).to(dtype)
                t = torch.empty(p.numel(), dtype=dtype)
                for start in range(0, p.numel(), _RANDOM_BLOCK):  # one write pass, no temporaries
                    chunk = t[start : start + _RANDOM_BLOCK]
                    chunk.copy_(scaled[: chunk.numel()])
                t = t.view(p.shape)
            elif name == "weight":  # norm scales
                t = torch.ones(p.shape, dtype=dtype)
            else:  # biases: small but non-zero, so "non-zero parameters" reads as dense
                n = p.numel()
                t = (block[:n].repeat(n // _RANDOM_BLOCK + 1)[:n] * 0.02).to(dtype).view(p.shape)
            mod._parameters[name] = nn.Parameter(t.to(device), requires_grad=False)
    nn.Module.to(module, device=device, dtype=dtype)  # buffers
    return module


_RANDOM_BLOCK = 1_000_003
