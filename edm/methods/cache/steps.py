"""Fewer denoising steps: the baseline every cache is compared with.

Skipping whole steps is the crudest way to cut a trajectory's compute, so a cache is only worth
its hooks if it beats a plain run with fewer steps at the same FLOPs. The step count is a
generation setting, not a patch, so this "method" changes nothing in the pipeline: its config
(``conf/method/fewer_steps.yaml``, package ``_global_``) sets ``gen.num_inference_steps`` from
``method.num_inference_steps``, so validation, generation, FLOPs per step, ``run.protocol`` and
the tables all see the real count, and the run sits in the same tables as the caches under its
own method name. The object only checks that nothing later in the config (a protocol, an
experiment, a ``gen.num_inference_steps=`` on the command line) overrode that value, and
records the count and its fraction of the model's default.
"""

from __future__ import annotations

from typing import ClassVar

from edm.errors import ConfigError
from edm.families import FAMILIES
from edm.methods.base import ApplyContext, Method, MethodReport


class FewerSteps(Method):
    """Run the model's sampler with ``num_inference_steps`` steps instead of its default.

    Args:
        num_inference_steps (`int`, defaults to 10): the steps to sample with (>= 1).
        gen_steps (`int`): the run's resolved ``gen.num_inference_steps`` (the config passes it);
            must equal ``num_inference_steps``.
        dense_steps (`int | None`): the model's default steps (``model.gen``), for the fraction.
        name, tag: run bookkeeping.
    """

    kind: ClassVar[str] = "runtime"  # changes how the pipeline runs, not its weights
    supported_families = FAMILIES

    def __init__(self, num_inference_steps: int = 10, gen_steps: int | None = None,
                 dense_steps: int | None = None, name: str = "fewer_steps",
                 tag: str | None = None):
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("method.num_inference_steps", f"must be an int >= 1, got {n!r}.")
        if gen_steps is not None and int(gen_steps) != n:
            raise ConfigError(
                "gen.num_inference_steps",
                f"is {gen_steps} but method=fewer_steps sets {n}: a later config (protocol, "
                "experiment) or the command line overrode it; set method.num_inference_steps "
                "instead.")
        self.num_inference_steps, self.dense_steps = n, dense_steps
        self.name, self.tag = name, tag or f"steps{n}"

    def reference_gen(self, gen: dict) -> dict:
        # paired fidelity compares with the dense model at its own steps, not at ours
        return {**gen, "num_inference_steps": int(self.dense_steps)} if self.dense_steps else gen

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        got = ctx.gen.get("num_inference_steps")
        if got is not None and int(got) != self.num_inference_steps:
            raise RuntimeError(f"<method={self.name}> the run generates with {got} steps, not "
                               f"{self.num_inference_steps}; gen.num_inference_steps was changed")
        metrics = {"num_inference_steps": float(self.num_inference_steps)}
        if self.dense_steps:
            metrics["dense_steps"] = float(self.dense_steps)
            metrics["step_fraction"] = self.num_inference_steps / float(self.dense_steps)
        return MethodReport(name=self.name, kind=self.kind, patched=0, metrics=metrics)


__all__ = ["FewerSteps"]
