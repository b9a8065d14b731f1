"""Fréchet distance between two Gaussians, shared by FID (clean-fid features) and digit FID.

The formula and its regularisation follow clean-fid / pytorch-fid (tested equal to clean-fid's
``frechet_distance`` in tests/test_eval_metrics.py). It is not imported from clean-fid because
clean-fid 0.1.35 calls ``scipy.linalg.sqrtm(..., disp=False)``, an argument newer SciPy removed
(measured: a TypeError on the GPU machine's SciPy), which would break every FID evaluation there.
"""

from __future__ import annotations

import numpy as np


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)`` in float64.

    Args:
        mu1, mu2: means ``[D]``; sigma1, sigma2: covariances ``[D, D]``.
        eps: diagonal offset used only when ``S1 S2`` is singular (few samples in high
            dimension), as clean-fid does.
    """
    from scipy import linalg

    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)  # imaginary parts are numerical noise
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
