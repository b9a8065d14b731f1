"""OBS-Diff (Zhu et al., ICLR 2026; spec §2): OBS with a timestep-weighted Hessian and module
packages. :class:`OBSDiff` prunes weights (unstructured and N:M) with the column-block solver of
``obs.py``; heads and FFN neurons are :class:`~edm.methods.weight.obs_diff_structured.OBSDiffStructured`.

``conf/method/obs_diff.yaml`` targets :func:`obs_diff`, which builds one or the other from
``method.granularity``, so ``method=obs_diff method.granularity=structured`` is the same method
as ``method=obs_diff_structured``.
"""

from __future__ import annotations

from torch import nn

from edm.errors import ConfigError
from edm.methods.weight.base_layerwise import LayerwisePruning
from edm.methods.weight.base_weight import write_weight
from edm.methods.weight.obs import MASK_RULES, obs_prune
from edm.methods.weight.obs_diff_structured import OBSDiffStructured

# Keys of conf/method/obs_diff.yaml that only one granularity reads, with the value that means
# "not set": a value set for the other granularity is an error rather than silently ignored.
_ONLY = {
    "unstructured": {"pattern": "unstructured", "blocks": None, "blocksize": 128,
                     "mask_rule": "exact", "keep_backup": False, "export": None},
    "structured": {"exclude_first_last": None, "no_compensate": False, "rrf_k": 60, "save": True},
}
GRANULARITIES = tuple(_ONLY)


class OBSDiff(LayerwisePruning):
    """OBS-Diff, unstructured or N:M. Shared arguments: :class:`LayerwisePruning`.

    Args:
        percdamp: Hessian damping as a fraction of mean(diag H); 0.01 as the paper. Raise it if a
            Cholesky fails (the solver already retries with 10x more, and logs it).
        blocksize: OBS lazy-update block and unstructured mask window (128 as the paper); must be
            a multiple of M for N:M.
        mask_rule: ``exact`` (default): each 128-column block loses exactly
            ``int(numel * sparsity)`` weights, so methods compare at the requested sparsity.
            ``reference``: the official ``fasterprune`` threshold ``score <= sorted[k]``, which
            removes one more (and every tie); output is then bit-identical to the official code.
    """

    def __init__(
        self,
        sparsity: float,
        percdamp: float = 0.01,
        blocksize: int = 128,
        mask_rule: str = "exact",
        name: str = "obs_diff",
        **kwargs,
    ):
        super().__init__(sparsity, name=name, **kwargs)
        if mask_rule not in MASK_RULES:
            raise ConfigError("method.mask_rule", f"unknown {mask_rule!r}.", MASK_RULES)
        if not float(percdamp) > 0:
            raise ConfigError("method.percdamp", f"must be > 0, got {percdamp}.")
        if int(blocksize) < 1 or (self.nm and int(blocksize) % self.nm[1]):
            raise ConfigError(
                "method.blocksize", f"must be >= 1 and a multiple of M for N:M, got {blocksize}."
            )
        self.percdamp, self.blocksize = float(percdamp), int(blocksize)
        self.mask_rule = str(mask_rule)

    def prune_layer(self, name: str, module: nn.Module, stat) -> None:
        n, m = self.nm or (0, 0)
        W, _ = obs_prune(
            module.weight, stat.H, self.sparsity, n, m, self.blocksize, self.percdamp,
            self.mask_rule,
        )
        stat.free()  # the Hessian is not needed any more; free it before the next layer
        write_weight(module, W)


def obs_diff(sparsity: float, granularity: str = "unstructured", **kwargs):
    """The method of ``conf/method/obs_diff.yaml``: :class:`OBSDiff` for
    ``granularity=unstructured``, :class:`OBSDiffStructured` for ``structured`` (heads + FFN
    neurons, physically sliced). Each gets the keys it reads; a key of the other granularity
    must keep its default (``pattern`` must stay ``unstructured`` for structured pruning)."""
    if granularity not in _ONLY:
        raise ConfigError("method.granularity", f"unknown {granularity!r}.", GRANULARITIES)
    other = "structured" if granularity == "unstructured" else "unstructured"
    for key, unset in _ONLY[other].items():
        value = kwargs.pop(key, unset)
        if value != unset:
            hint = ("structured pruning removes whole heads/neurons; use pattern=unstructured "
                    "with granularity=structured." if key == "pattern" else
                    f"applies to granularity={other} only.")
            raise ConfigError(f"method.{key}", f"{hint} (got {value!r})", [unset])
    cls = OBSDiff if granularity == "unstructured" else OBSDiffStructured
    return cls(sparsity, **kwargs)
