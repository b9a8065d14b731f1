"""The dense baseline: does nothing and says so."""

from __future__ import annotations

from edm.families import FAMILIES
from edm.methods.base import ApplyContext, Method, MethodReport


class NoMethod(Method):
    """Identity method (``method=none``)."""

    kind = "none"
    supported_families = FAMILIES  # the dense baseline runs on every family, FLUX.1 included

    def __init__(self, name: str = "none", tag: str = "dense", **ignored):
        # Sweeps such as `method=none,wanda ++method.pattern=2:4` pass method knobs to every
        # point; the dense baseline has none, so it accepts and ignores them.
        self.name, self.tag, self.ignored = name, tag, sorted(ignored)

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        return MethodReport(name=self.name, kind=self.kind, patched=0, sparsity=0.0)
