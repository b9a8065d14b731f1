"""Glue shared by the cache methods (no cache algorithm lives here).

* :class:`ReplayHook`: a ``diffusers.hooks.ModelHook`` that, on a full call, runs its module and
  keeps the output, and on a cached call returns the kept output without running the module
  (DeepCache's reuse, written on the public hook seam instead of a forked ``forward``).
* :class:`AppliedHooks`: what one of diffusers' ``apply_*`` functions (or ``enable_cache``)
  registered, found by diffing the hook registries before and after, so that removal takes
  exactly those hooks off without naming diffusers' private hook-name constants.
* :class:`TrajectoryReset` / :class:`ContextHook`: what diffusers' stateful cache hooks expect
  from a pipeline. Their state must be reset before every trajectory (only ``CacheMixin`` models
  get that from ``DiffusionPipeline.maybe_free_model_hooks``, and only *after* a call), and FBC,
  TaylorSeer and MagCache read their state through a cache context that only pipelines of
  ``CacheMixin`` models (FLUX.1) open around the denoiser call; SD3's and the UNets' do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from edm.state import StepTracker


class ReplayHook(ModelHook):
    """Run and remember (``gate.full``), or replay the remembered output (cached call).

    Args:
        gate: any object with a boolean ``full`` attribute, set per denoiser call.
    """

    def __init__(self, gate):
        super().__init__()
        self.gate = gate
        self.output: Any = None

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if self.gate.full or self.output is None:
            # ``output is None``: the module was not called on the last full call (a branch
            # of the forward that depends on the inputs); running it is always correct.
            self.output = self.fn_ref.original_forward(*args, **kwargs)
        return self.output


def _registries(root: nn.Module) -> dict[int, tuple[nn.Module, set[str]]]:
    return {id(m): (m, set(m._diffusers_hook.hooks)) for m in root.modules()
            if hasattr(m, "_diffusers_hook")}


class AppliedHooks:
    """The hooks a third-party ``apply`` call registered under ``root``; ``remove()`` undoes it.

    Use as ``with AppliedHooks(root) as added: apply_x(root, cfg)``; ``added.hooks`` then lists
    ``(module, hook_name)``. ``remove`` takes them off (``disable`` instead when given, e.g.
    ``model.disable_cache``), then drops, where the hooks are gone, the registries and the
    instance-level ``forward`` that removal leaves behind on modules that had neither before, so
    the model is the object it was (later class-level patches are not shadowed).
    """

    def __init__(self, root: nn.Module, disable: Callable[[], None] | None = None):
        self.root, self.disable = root, disable
        self.hooks: list[tuple[nn.Module, str]] = []
        self._touched: list[nn.Module] = []

    def __enter__(self):
        self._before = _registries(self.root)
        # what each module looked like: a registry? an instance-level forward?
        self._had = {id(m): (hasattr(m, "_diffusers_hook"), "forward" in m.__dict__)
                     for m in self.root.modules()}
        return self

    def __exit__(self, exc_type, *exc):
        after = _registries(self.root)
        for key, (module, names) in after.items():
            old = self._before.get(key, (module, set()))[1]
            self.hooks += [(module, n) for n in module._diffusers_hook.hooks if n not in old]
        self._touched = [m for key, (m, _) in after.items() if key in self._had]
        if hasattr(self.root, "_diffusers_hook"):  # registrations stale its child-registry list
            self.root._diffusers_hook.invalidate_child_registries_cache()
        if exc_type is not None:
            self.remove()
        return False

    @property
    def modules(self) -> int:
        return len({id(m) for m, _ in self.hooks})

    def remove(self) -> None:
        if self.disable is not None:
            self.disable()
        for module, name in reversed(self.hooks):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and name in registry.hooks:
                registry.remove_hook(name, recurse=False)
        for module in self._touched:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or registry.hooks:
                continue
            had_registry, had_forward = self._had[id(module)]
            if not had_forward:  # removing the last hook leaves the bound forward behind
                module.__dict__.pop("forward", None)
            if not had_registry:
                del module._diffusers_hook
        if hasattr(self.root, "_diffusers_hook"):
            self.root._diffusers_hook.invalidate_child_registries_cache()
        self.hooks.clear()
        self._touched = []


class TrajectoryReset:
    """Resets every stateful diffusers hook under ``denoiser`` at the first call of each
    trajectory (a torch pre-hook registered after the :class:`StepTracker`, so it sees this
    call's step index). Without it a cache would compare the first step of one batch of
    images with the last step of the previous batch."""

    def __init__(self, denoiser: nn.Module, tracker: StepTracker):
        self.denoiser, self.tracker = denoiser, tracker
        self._handle = denoiser.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        if self.tracker.state.step_index == 0:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)

    def remove(self) -> None:
        self._handle.remove()


class ContextHook(ModelHook):
    """Opens diffusers' cache context around each denoiser call, as FLUX.1's pipeline does.

    ``CacheMixin.cache_context`` is the documented entry point; it only walks hook registries,
    so it serves denoisers that are not ``CacheMixin`` (SD3, UNets) as well. One name for every
    call: these pipelines batch the CFG halves into one call.
    """

    def __init__(self, name: str = "edm"):
        super().__init__()
        self.name = name

    def new_forward(self, module: nn.Module, *args, **kwargs):
        from diffusers.models.cache_utils import CacheMixin

        with CacheMixin.cache_context(module, self.name):
            return self.fn_ref.original_forward(*args, **kwargs)


def scheduler_timestep(pipe, tracker: StepTracker) -> Callable[[], float]:
    """A ``current_timestep_callback`` in scheduler units (0..1000, what the hooks' timestep
    ranges mean). Pipelines that expose ``current_timestep`` (FLUX.1, which passes ``t / 1000``
    to its transformer) are read directly; the others pass the scheduler's ``t`` to the
    denoiser, which the tracker recorded."""
    has_property = isinstance(getattr(type(pipe), "current_timestep", None), property)

    def current() -> float:
        t = pipe.current_timestep if has_property else None
        if t is None:
            t = tracker.state.timestep
        if t is None:  # meta-device calls carry no value
            return -1.0
        return float(t.flatten()[0]) if hasattr(t, "flatten") else float(t)

    return current
