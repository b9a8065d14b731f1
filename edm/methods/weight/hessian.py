"""Timestep weights and per-layer calibration statistics (pure tensors, no diffusers).

OBS-Diff (spec §2.2) weights the layer-wise reconstruction objective of each denoising step t by
alpha_t and accumulates the Hessian of ``||W X - W_hat X||^2`` as a *normalised* weighted second
moment of the layer input::

    H = 2 / sum_calls(alpha_t * b) * sum_calls(alpha_t * X_t X_t^T)

where a "call" is one forward of the layer (b = batch rows of that call, 2x prompts under CFG)
and X_t is the call's input flattened to [d_in, b * tokens]. The statistics below all follow that
running-mean recipe, so calling ``update`` in any batch split gives the same result.

Every statistic exposes ``update(x, alpha)`` (x: [b, ..., d_in], or [tokens, d_in] counted as
b = 1 like the reference code) and ``nbytes()`` (memory held, reported by module packages).
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("log_decrease", "uniform", "linear_increase", "linear_decrease", "log_increase")


def timestep_weights(
    strategy: str, num_steps: int, alpha_min: float = 0.8, alpha_max: float = 1.2
) -> torch.Tensor:
    """Per-step weights alpha, indexed by the 0-based step (0 = first, noisiest step).

    Args:
        strategy: ``log_decrease`` (OBS-Diff Eq. 4, the default: early steps weigh more, with a
            log-shaped fall-off), ``uniform`` (SparseGPT), ``linear_increase``,
            ``linear_decrease``, ``log_increase`` (the paper's Table 6 ablation).
        num_steps: number of denoising steps T.
        alpha_min, alpha_max: range of the weights (paper: 0.8 and 1.2).

    Returns:
        float64 tensor [T]. ``log_decrease`` gives ``alpha_min + (alpha_max - alpha_min) *
        ln(T - i) / ln(T)``, i.e. 1.2 at i = 0 and 0.8 at i = T - 1 with the defaults.
    """
    if strategy not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {strategy!r}; allowed: {WEIGHTINGS}")
    T = int(num_steps)
    if T < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    span = alpha_max - alpha_min
    if strategy == "uniform":
        return torch.ones(T, dtype=torch.float64)
    if strategy == "linear_increase":
        return torch.linspace(alpha_min, alpha_max, T, dtype=torch.float64)
    if strategy == "linear_decrease":
        return torch.linspace(alpha_max, alpha_min, T, dtype=torch.float64)
    if T == 1:  # ln(1) = 0: a single step takes the weight of the noisiest step
        return torch.full(
            (1,), alpha_max if strategy == "log_decrease" else alpha_min, dtype=torch.float64
        )
    # ln(1 + k) / ln(T) for k = 0..T-1 rises from 0 to 1; log_decrease is its reversal.
    rising = alpha_min + span * torch.log1p(torch.arange(T, dtype=torch.float64)) / math.log(T)
    return rising.flip(0) if strategy == "log_decrease" else rising


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[b, ..., d] -> ([b * tokens, d] fp32, b). A 2-D input is one sample (b = 1)."""
    b = int(x.shape[0]) if x.dim() >= 3 else 1
    return x.reshape(-1, x.shape[-1]).float(), b


class HessianStat:
    """Running ``H = 2 / sum(alpha b) * sum(alpha X X^T)`` in fp32 (OBS-Diff ``add_batch``).

    Args:
        d_in: number of input features of the layer.
        device: where H lives (the layer's device).
    """

    def __init__(self, d_in: int, device: torch.device | str | None = None):
        self.H = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.weight_sum = 0.0  # sum over calls of alpha * b

    def update(self, x: torch.Tensor, alpha: float = 1.0) -> None:
        X, b = _flatten(x)
        w_new = float(alpha) * b
        total = self.weight_sum + w_new
        # H <- H * S / (S + w) + (2 alpha / (S + w)) X^T X   (one fused, in-place op)
        self.H.addmm_(X.T, X, beta=self.weight_sum / total, alpha=2.0 * float(alpha) / total)
        self.weight_sum = total

    def nbytes(self) -> int:
        return self.H.numel() * self.H.element_size() if self.H is not None else 0

    def free(self) -> None:
        self.H = None


class InputNormStat:
    """Wanda's ``scaler_row``: weighted mean over samples of sum_tokens x_j^2, per input feature.

    Equals ``diag(H) / 2`` of :class:`HessianStat` for the same calls, in O(d_in) memory.
    """

    def __init__(self, d_in: int, device: torch.device | str | None = None):
        self.sq_norm = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.weight_sum = 0.0

    def update(self, x: torch.Tensor, alpha: float = 1.0) -> None:
        X, b = _flatten(x)
        w_new = float(alpha) * b
        total = self.weight_sum + w_new
        self.sq_norm.mul_(self.weight_sum / total).add_(
            X.square().sum(0), alpha=float(alpha) / total
        )
        self.weight_sum = total

    def nbytes(self) -> int:
        return self.sq_norm.numel() * self.sq_norm.element_size()


class DSnoTStat(HessianStat):
    """Hessian (SparseGPT-score start) plus DSnoT's input moments, all timestep-weighted.

    Attributes (after updates):
        H: as :class:`HessianStat`.
        sum_per_sample: weighted mean over samples of sum_tokens x_j (DSnoT ``sum_metric_row``,
            the expected per-sample output change of removing a weight is ``W_rj * this``).
        mean, var: weighted per-token mean and (biased) variance of x_j.
    """

    def __init__(self, d_in: int, device: torch.device | str | None = None):
        super().__init__(d_in, device)
        self.sum_per_sample = torch.zeros(d_in, dtype=torch.float32, device=device)
        self._tok_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self._tok_sq = torch.zeros(d_in, dtype=torch.float64, device=device)
        self._tok_weight = 0.0

    def update(self, x: torch.Tensor, alpha: float = 1.0) -> None:
        X, b = _flatten(x)
        w_new = float(alpha) * b
        total = self.weight_sum + w_new
        self.sum_per_sample.mul_(self.weight_sum / total).add_(
            X.sum(0), alpha=float(alpha) / total
        )
        self._tok_sum.add_(X.sum(0).double(), alpha=float(alpha))
        self._tok_sq.add_(X.square().sum(0).double(), alpha=float(alpha))
        self._tok_weight += float(alpha) * X.shape[0]
        super().update(x, alpha)  # updates H and weight_sum

    @property
    def mean(self) -> torch.Tensor:
        return (self._tok_sum / max(self._tok_weight, 1e-12)).float()

    @property
    def var(self) -> torch.Tensor:
        m = self._tok_sum / max(self._tok_weight, 1e-12)
        return (self._tok_sq / max(self._tok_weight, 1e-12) - m.square()).clamp_min(0).float()

    @property
    def sq_norm(self) -> torch.Tensor:
        """Wanda's scaler_row, recovered from the Hessian diagonal."""
        return torch.diagonal(self.H) / 2

    def nbytes(self) -> int:
        return super().nbytes() + 4 * self.sum_per_sample.numel() + 16 * self._tok_sum.numel()
