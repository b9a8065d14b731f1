"""One interface for every efficiency method: ``apply(pipe, ctx) -> MethodReport`` and ``remove(pipe)``.

Two families implement it:

* :class:`RuntimeMethod` (ToMe, AT-EDM): installs attention processors and hooks through public
  diffusers seams, counts what it patched (0 is an error, never a silent no-op) and can be removed
  bit-exactly. Applying twice first removes the earlier patch.
* :class:`WeightMethod` (magnitude, Wanda, SparseGPT, OBS-Diff, ...): calibrates and prunes once,
  in place, and reports what it *measured* afterwards (sparsity per layer, parameters, time).

Methods are built by Hydra from ``conf/method/*.yaml`` (``_target_``) before any model is loaded,
so their constructors validate arguments and raise :class:`edm.errors.ConfigError` early;
:meth:`Method.check` validates the model family, also before loading.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from edm.errors import NothingPatchedError, UnsupportedFamily
from edm.families import METHOD_FAMILIES


@dataclass
class ApplyContext:
    """Everything a method may need besides the pipeline.

    Attributes:
        family: model family (``digits``, ``sd15``, ``sd21``, ``sdxl``, ``sd3``).
        device, dtype: where and in what precision the pipeline runs.
        seed: the run's seed (calibration derives its own generators from it).
        output_dir: the run's output directory (methods may save artefacts there).
        gen: generation settings of the run (``num_inference_steps``, ``guidance_scale``,
            ``height``, ``width``, ``batch_size``); runtime methods use them for FLOPs/step.
        calib: calibration set for weight methods (``edm.data.calib.CalibSet``) or ``None``.
        train_data: callable returning training images for methods that need images
            (Diff-Pruning fine-tuning on the embedded model), or ``None``.
        meta_cfg_batch: FLOPs tools on the meta device, where latents have no values, say
            whether their batch is a classifier-free-guidance pair (AT-EDM then maps the
            conditional half only, as it does in a real run).
    """

    family: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    seed: int = 0
    output_dir: Path | None = None
    gen: dict[str, Any] = field(default_factory=dict)
    calib: Any = None
    train_data: Any = None
    meta_cfg_batch: bool = False


@dataclass
class MethodReport:
    """What a method did, measured after the fact.

    ``metrics`` are scalars logged as ``method/<key>``; ``details`` (per-layer sparsity, patched
    module names, ...) go to ``method_report.json`` only.
    """

    name: str
    kind: str
    patched: int = 0
    sparsity: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        out = {"method/patched": float(self.patched)}
        if self.sparsity is not None:
            out["method/sparsity"] = float(self.sparsity)
        out.update({f"method/{k}": float(v) for k, v in self.metrics.items()})
        return out


class Method(abc.ABC):
    """Base class. Subclasses set ``kind`` and ``supported_families`` and implement ``apply``."""

    kind: ClassVar[str] = "none"
    # A feature cache (DeepCache, diffusers' cache hooks): reuses features across steps, so two
    # of them in one run would replay each other's stale outputs (edm.methods.compose refuses).
    is_cache: ClassVar[bool] = False
    supported_families: ClassVar[tuple[str, ...]] = METHOD_FAMILIES
    # Why torch.compile cannot trace the patched denoiser in one graph (None: it can; see
    # tests/test_compile_methods.py). Then ``compile.fullgraph=true`` is refused up front.
    graph_breaks: ClassVar[str | None] = None
    name: str = "method"

    def compile_blockers(self) -> list[str]:
        """``<method=name> reason`` for every part that breaks torch.compile's graph."""
        return [f"<method={self.name}> {self.graph_breaks}"] if self.graph_breaks else []

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise :class:`ConfigError` before loading if the method cannot run on this device
        and dtype (e.g. ``method.export=semi_structured`` needs CUDA fp16/bf16)."""

    def check(self, family: str) -> None:
        """Raise :class:`UnsupportedFamily` before any model is loaded."""
        if family not in self.supported_families:
            raise UnsupportedFamily(
                f"<method={self.name}> does not support model family {family!r}; "
                f"supported: {', '.join(self.supported_families)}"
            )

    @abc.abstractmethod
    def apply(self, pipe, ctx: ApplyContext) -> MethodReport: ...

    def remove(self, pipe) -> None:  # noqa: B027 - optional for weight methods
        """Undo ``apply``. Runtime methods always can; weight methods raise unless they kept a backup."""

    def reference_gen(self, gen: dict) -> dict:
        """Generation settings of the dense images this method is compared with
        (``eval=paired``): the run's own, unless the method changes the protocol itself
        (``fewer_steps``), which then restores the dense model's."""
        return gen

    def run_metrics(self) -> dict[str, float]:
        """What the method measured while the pipeline ran (logged as ``method/<key>``).

        The runner reads it after generation and before FLOPs counting (whose meta-device calls
        are not generation). Token methods report the ratio they actually used, which DSAP and
        integer token counts make differ from the configured one.
        """
        return {}


@dataclass
class RatioMeter:
    """Mean fraction of tokens removed per call of a pruning/merging layer.

    Every call counts equally, so with DSAP (a ratio per step) this is the per-step average the
    method really ran at; calls on the meta device (FLOPs counting) are not recorded.

    Under ``torch.compile`` the layer hooks are traced: a Python counter there would be read
    into a guard and every call would recompile. Traced calls therefore add to a tensor on the
    activations' device (an in-graph in-place add, no guard, no host sync); eager calls keep the
    plain Python sum. ``metrics()`` reads both.
    """

    total: float = 0.0
    calls: int = 0
    traced: torch.Tensor | None = None  # [sum of fractions, calls], float64, traced calls only

    def prepare(self, device: torch.device) -> None:
        """Called eagerly before each denoiser call (the methods' denoiser pre-hooks): creating
        the tensor there rather than in the first traced call saves a recompile."""
        if device.type != "meta" and (self.traced is None or self.traced.device != device):
            self.traced = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, removed: int, present: int, device: torch.device) -> None:
        if not present or device.type == "meta":
            return
        if torch.compiler.is_compiling():
            self.prepare(device)
            self.traced.add_(torch.tensor([removed / present, 1.0], dtype=torch.float64,
                                          device=device))
            return
        self.total += removed / present
        self.calls += 1

    def metrics(self) -> dict[str, float]:
        total, calls = self.total, self.calls
        if self.traced is not None:
            t_total, t_calls = self.traced.tolist()
            total, calls = total + t_total, calls + int(t_calls)
        if not calls:
            return {}
        return {"token_ratio_measured": total / calls, "token_layer_calls": calls}


class Patcher:
    """Records every processor swap and hook so that ``undo()`` restores the model exactly."""

    def __init__(self):
        self._processors: list[tuple[nn.Module, Any]] = []
        self._registry_hooks: list[tuple[nn.Module, str]] = []
        self._handles: list[Any] = []
        self._fresh_registry: list[nn.Module] = []  # modules that had no hook registry before

    def set_processor(self, attn: nn.Module, processor) -> None:
        self._processors.append((attn, attn.get_processor()))
        attn.set_processor(processor)

    def register_hook(self, module: nn.Module, hook, name: str) -> None:
        """Register a ``diffusers.hooks.ModelHook`` under ``name`` (removed by ``undo``)."""
        from diffusers.hooks import HookRegistry

        if not hasattr(module, "_diffusers_hook") and "forward" not in module.__dict__:
            self._fresh_registry.append(module)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._registry_hooks.append((module, name))

    def add_handle(self, handle) -> None:
        """Keep a torch ``RemovableHandle`` (forward/pre hooks) for removal."""
        self._handles.append(handle)

    @property
    def count(self) -> int:
        return len(self._processors) + len(self._registry_hooks)

    def undo(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        for module, name in reversed(self._registry_hooks):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(name, recurse=False)
        # HookRegistry.remove_hook leaves the original bound forward as an instance attribute;
        # drop it (and the empty registry) where we created them, so later class-level patches
        # (e.g. tomesd's class swap) are not silently shadowed.
        for module in self._fresh_registry:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and not registry.hooks:
                module.__dict__.pop("forward", None)
                del module._diffusers_hook
        for attn, proc in reversed(self._processors):
            attn.set_processor(proc)
        self._fresh_registry.clear()
        self._handles.clear()
        self._registry_hooks.clear()
        self._processors.clear()


class RuntimeMethod(Method):
    """A method that patches the model at run time and can be removed.

    Subclasses implement :meth:`install`, returning how many modules they patched.
    """

    kind: ClassVar[str] = "runtime"

    def __init__(self):
        self._patcher: Patcher | None = None

    @abc.abstractmethod
    def install(self, pipe, patcher: Patcher, ctx: ApplyContext) -> MethodReport: ...

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        self.check(ctx.family)
        if self._patcher is not None:  # never double-patch
            self.remove(pipe)
        patcher = Patcher()
        try:
            report = self.install(pipe, patcher, ctx)
        except Exception:
            patcher.undo()
            raise
        if report.patched == 0:
            patcher.undo()
            raise NothingPatchedError(
                f"<method={self.name}> patched nothing on family {ctx.family!r}; check its "
                "layer-selection settings (a patch that changes nothing is reported as an error)"
            )
        self._patcher = patcher
        return report

    def remove(self, pipe) -> None:
        if self._patcher is not None:
            self._patcher.undo()
            self._patcher = None

    def run_metrics(self) -> dict[str, float]:
        # install() of a token method sets ``_meter`` to the RatioMeter its hooks fill
        meter = getattr(self, "_meter", None)
        return meter.metrics() if meter is not None else {}


class WeightMethod(Method):
    """A method that changes weights once. Not reversible unless ``keep_backup`` is set."""

    kind: ClassVar[str] = "weights"

    def __init__(self, keep_backup: bool = False):
        self.keep_backup = keep_backup
        self._backup: dict[str, torch.Tensor] | None = None

    def backup(self, named_modules: list[tuple[str, nn.Module]]) -> None:
        if self.keep_backup:
            self._backup = {
                n: m.weight.detach().to("cpu", copy=True) for n, m in named_modules
            }
            self._backup_modules = dict(named_modules)

    def remove(self, pipe) -> None:
        if self._backup is None:
            raise RuntimeError(
                f"<method={self.name}> changed weights in place; set method.keep_backup=true to undo"
            )
        from edm.perf import is_semi_structured

        with torch.no_grad():
            for n, w in self._backup.items():
                m = self._backup_modules[n]
                if is_semi_structured(m.weight):  # method.export: back to a dense parameter
                    m.weight = nn.Parameter(w.to(m.weight.device, m.weight.dtype))
                else:
                    m.weight.copy_(w)
        self._backup = None


class Sequential(Method):
    """Apply several methods in order (e.g. a weight method, then a token method)."""

    kind: ClassVar[str] = "compose"

    def __init__(self, methods: list[Method], name: str = "compose"):
        self.methods = list(methods)
        self.name = name

    def check(self, family: str) -> None:
        for m in self.methods:
            m.check(family)

    def compile_blockers(self) -> list[str]:
        return [b for m in self.methods for b in m.compile_blockers()]

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        for m in self.methods:
            m.check_device(device, dtype)

    def apply(self, pipe, ctx: ApplyContext) -> MethodReport:
        reports = [m.apply(pipe, ctx) for m in self.methods]
        out = MethodReport(name=self.name, kind=self.kind, patched=sum(r.patched for r in reports))
        for r in reports:
            out.sparsity = r.sparsity if r.sparsity is not None else out.sparsity
            out.metrics.update({f"{r.name}/{k}": v for k, v in r.metrics.items()})
            out.details[r.name] = r.details
        return out

    def remove(self, pipe) -> None:
        for m in reversed(self.methods):
            m.remove(pipe)

    def reference_gen(self, gen: dict) -> dict:
        for m in self.methods:
            gen = m.reference_gen(gen)
        return gen

    def run_metrics(self) -> dict[str, float]:
        return {f"{m.name}/{k}": v for m in self.methods for k, v in m.run_metrics().items()}
