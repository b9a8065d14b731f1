"""OBS-Diff (Zhu et al., ICLR 2026; spec §2): OBS with a timestep-weighted Hessian and module
packages. ``granularity: unstructured`` covers unstructured and N:M patterns with the column-block
solver of ``obs.py``; ``granularity: structured`` (heads / FFN neurons, physically sliced) runs the
structured pruner of ``structured.py``/``slicing.py`` with this class's calibration.
"""

from __future__ import annotations

import time

from torch import nn

from edm.errors import ConfigError
from edm.families import adapter
from edm.methods.base import ApplyContext, MethodReport
from edm.methods.weight.base_weight import PruningMethod, _peak_memory_gb, write_weight
from edm.methods.weight.obs import MASK_RULES, obs_prune

GRANULARITIES = ("unstructured", "structured")


class OBSDiff(PruningMethod):
    """OBS-Diff. Shared arguments: :class:`PruningMethod`.

    Args:
        granularity: ``unstructured`` (weights; ``pattern`` picks unstructured / 2:4 / 4:8) or
            ``structured`` (attention heads and FFN neurons, then physical slicing).
        percdamp: Hessian damping as a fraction of mean(diag H); 0.01 as the paper. Raise it if a
            Cholesky fails (the solver already retries with 10x more, and logs it).
        blocksize: OBS lazy-update block and unstructured mask window (128 as the paper); must be
            a multiple of M for N:M.
        exclude_first_last: structured only; skip the first and last transformer blocks.
            ``None`` (default) = as the paper's tables: excluded for MMDiT (Tables 4/9), included
            for UNets (Table 3's 1.91 B / 4.70 T are reproduced only with every block pruned).
        no_compensate: structured only; remove columns without the OBS weight update (ablation).
        rrf_k: structured MMDiT only; reciprocal-rank-fusion constant for joint heads (60).
        mask_rule: unstructured only. ``exact`` (default): each 128-column block loses exactly
            ``int(numel * sparsity)`` weights, so methods compare at the requested sparsity.
            ``reference``: the official ``fasterprune`` threshold ``score <= sorted[k]``, which
            removes one more (and every tie); output is then bit-identical to the official code.
    """

    def __init__(
        self,
        sparsity: float,
        granularity: str = "unstructured",
        percdamp: float = 0.01,
        blocksize: int = 128,
        exclude_first_last: bool | None = None,
        no_compensate: bool = False,
        rrf_k: int = 60,
        mask_rule: str = "exact",
        name: str = "obs_diff",
        **kwargs,
    ):
        super().__init__(sparsity, name=name, **kwargs)
        if granularity not in GRANULARITIES:
            raise ConfigError("method.granularity", f"unknown {granularity!r}.", GRANULARITIES)
        if granularity == "structured" and self.nm is not None:
            raise ConfigError(
                "method.pattern",
                "structured pruning removes whole heads/neurons; use "
                "pattern=unstructured with granularity=structured.",
                ["unstructured"],
            )
        if mask_rule not in MASK_RULES:
            raise ConfigError("method.mask_rule", f"unknown {mask_rule!r}.", MASK_RULES)
        if not float(percdamp) > 0:
            raise ConfigError("method.percdamp", f"must be > 0, got {percdamp}.")
        if int(blocksize) < 1 or (self.nm and int(blocksize) % self.nm[1]):
            raise ConfigError(
                "method.blocksize", f"must be >= 1 and a multiple of M for N:M, got {blocksize}."
            )
        self.granularity = granularity
        self.percdamp, self.blocksize = float(percdamp), int(blocksize)
        # None: the paper's per-family choice (MMDiT tables exclude the first and last blocks;
        # the SDXL table's numbers are only reproduced with every block pruned).
        self.exclude_first_last = None if exclude_first_last is None else bool(exclude_first_last)
        self.no_compensate = bool(no_compensate)
        self.rrf_k = int(rrf_k)
        self.mask_rule = str(mask_rule)

    def prune_layer(self, name: str, module: nn.Module, stat) -> None:
        n, m = self.nm or (0, 0)
        W, _ = obs_prune(
            module.weight, stat.H, self.sparsity, n, m, self.blocksize, self.percdamp,
            self.mask_rule,
        )
        stat.free()  # the Hessian is not needed any more; free it before the next layer
        write_weight(module, W)

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        if self.granularity == "unstructured":
            return super().apply(pipe, ctx)
        return self._apply_structured(pipe, ctx)

    def _apply_structured(self, pipe, ctx: ApplyContext) -> MethodReport:
        try:
            from edm.methods.weight.slicing import prune_structured
        except ImportError as e:  # part of the package written separately
            raise NotImplementedError(
                "structured OBS-Diff needs edm.methods.weight.slicing"
            ) from e
        self.check(ctx.family)
        denoiser = adapter(pipe).denoiser(pipe)
        device = next(denoiser.parameters()).device
        params_before = sum(p.numel() for p in denoiser.parameters())
        self._timing = {"calib_seconds": 0.0, "solve_seconds": 0.0}
        collect = self.hessian_collector(pipe, ctx)
        t0 = time.perf_counter()
        details = prune_structured(
            denoiser,
            ctx.family,
            self.sparsity,
            collect,
            exclude_first_last=self.exclude_first_last,
            num_packages=self.num_groups,
            percdamp=self.percdamp,
            no_compensate=self.no_compensate,
            rrf_k=self.rrf_k,
            groups=self.targets,
        )
        total = time.perf_counter() - t0
        params_after = sum(p.numel() for p in denoiser.parameters())
        peak_gb, peak_src = _peak_memory_gb(device)
        metrics = {
            "params_before": float(params_before),
            "params_after": float(params_after),
            "param_reduction": 1.0 - params_after / params_before,
            "calib_seconds": self._timing["calib_seconds"],
            "solve_seconds": total - self._timing["calib_seconds"],
            "prune_seconds": total,
            "peak_mem_gb": peak_gb,
        }
        details = dict(details or {}, peak_mem_source=peak_src, granularity="structured")
        from edm.methods.weight.io import save_to_run  # shapes changed: reload via pruned_from

        details["saved_to"] = save_to_run(denoiser, ctx, {"method": self.name,
                                                         "sparsity": self.sparsity})
        patched = int(details.get("patched", len(details.get("targets", [])) or 1))
        return MethodReport(
            name=self.name,
            kind=self.kind,
            patched=patched,
            sparsity=float(details.get("sparsity", self.sparsity)),
            metrics=metrics,
            details=details,
        )
