"""The dense baseline: does nothing and says so."""

from __future__ import annotations

from edm.methods.base import ApplyContext, Method, MethodReport


class NoMethod(Method):
    """Identity method (``method=none``)."""

    kind = "none"

    def __init__(self, name: str = "none", tag: str = "dense"):
        self.name, self.tag = name, tag

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        return MethodReport(name=self.name, kind=self.kind, patched=0, sparsity=0.0)
