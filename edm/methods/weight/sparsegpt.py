"""SparseGPT (Frantar & Alistarh, ICML 2023; spec §3.3): the same OBS solver with a uniformly
weighted Hessian. Kept as its own method/config so tables name it; it shares OBS-Diff's module
packages and calibration, so the only difference measured is the timestep weighting.
"""

from __future__ import annotations

from edm.errors import ConfigError
from edm.methods.weight.obs_diff import OBSDiff


class SparseGPT(OBSDiff):
    """SparseGPT = :class:`OBSDiff` with ``weighting="uniform"`` (unstructured and N:M only)."""

    def __init__(
        self, sparsity: float, weighting: str = "uniform", name: str = "sparsegpt", **kwargs
    ):
        # OBSDiff has no granularity: refuse it by name rather than with a TypeError
        if kwargs.pop("granularity", "unstructured") != "unstructured":
            raise ConfigError(
                "method.granularity",
                "SparseGPT is unstructured/N:M only; use method=obs_diff.",
                ["unstructured"],
            )
        super().__init__(sparsity, weighting=weighting, name=name, **kwargs)
