"""DeepCache (Ma, Fang & Wang, CVPR 2024) for diffusers UNets, on hooks.

A UNet's deep features change slowly between adjacent denoising steps while its shallow ones
carry the detail. DeepCache runs the whole UNet on *full* steps (step 0, then one every
``cache_interval`` steps, or a non-uniform schedule) and on the steps in between runs only the
shallow end of one skip branch: the down path up to that branch and the up path from it, with
the deep part's output taken from the last full step.

Branch ``(cache_block_id=b, cache_layer_id=l)``, DeepCache's indices (``cache_branch_id =
3 b + l`` in its ``DeepCacheSDHelper`` for SD's 3 resnets per up block): ``b`` counts down
blocks from the shallowest, ``l`` counts the resnets of the matching up block ``U =
up_blocks[-1 - b]`` from its *last* one. On a cached step:

* ``down_blocks[:b]`` and the first ``l`` resnets (+ attentions) of ``down_blocks[b]`` run; they
  produce the fresh skip features that the running up layers consume;
* the rest of the down path, the mid block and ``up_blocks[:-1 - b]`` return their last full-step
  output without running; so do the first ``len(U.resnets) - 1 - l`` resnets (+ attentions) of
  ``U``. The last of these is the cached feature DeepCache reuses: it enters ``U``'s running
  resnets concatenated with the fresh skip feature, as in the paper;
* the last ``l + 1`` resnets (+ attentions) of ``U``, the later up blocks, ``conv_in``, the time
  embedding and ``conv_out`` run.

Why this is exact where it should be: every skipped module is wrapped by a
:class:`~edm.methods.cache.hooks.ReplayHook`, which on a full step calls the module's own forward
unchanged (``cache_interval=1`` is bit-identical to dense) and on a cached step returns exactly
what that module returned at the last full step. The skipped modules' inputs are then not
computed at all (their producers are skipped too), so FLOPs counters see the real saving. The
UNet's own ``forward`` is never copied: the skip-connection bookkeeping (which up block pops which
down residuals) is diffusers', unchanged; a skipped down block simply hands over its cached
residual tuple, whose entries only skipped up modules consume.

Steps come from ``edm.state.StepTracker``. Step 0 is always full, so every trajectory refills
the cache; as a safety net a call is also full whenever the cache holds outputs of another batch
or latent size than the call's.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from edm.errors import ConfigError, NothingPatchedError
from edm.families import adapter
from edm.methods.base import ApplyContext, MethodReport, Patcher, RuntimeMethod
from edm.methods.cache.hooks import ReplayHook
from edm.methods.cache.schedule import SCHEDULES, full_steps
from edm.state import StepTracker

_HOOK = "edm_deepcache"


def cached_modules(unet: nn.Module, block: int, layer: int) -> list[tuple[str, nn.Module]]:
    """The modules that replay their output on a cached step of branch ``(block, layer)``.

    Raises :class:`ConfigError` when the branch does not exist in this UNet.
    """
    downs, ups = unet.down_blocks, unet.up_blocks
    if not 0 <= block < len(downs):
        raise ConfigError("method.cache_block_id",
                          f"{block}: this UNet has {len(downs)} down blocks (0..{len(downs) - 1}).")
    u = len(ups) - 1 - block
    n_up = len(ups[u].resnets)
    if not 0 <= layer < n_up:
        raise ConfigError("method.cache_layer_id",
                          f"{layer}: up block {u} of this UNet has {n_up} resnets (0..{n_up - 1}).")

    def pairs(prefix: str, blk: nn.Module, idx) -> list[tuple[str, nn.Module]]:
        attns = getattr(blk, "attentions", None) or []
        out = []
        for i in idx:
            out.append((f"{prefix}.resnets.{i}", blk.resnets[i]))
            if i < len(attns):
                out.append((f"{prefix}.attentions.{i}", attns[i]))
        return out

    out: list[tuple[str, nn.Module]] = []
    for i, down in enumerate(downs):
        if i > block or (i == block and layer == 0):
            out.append((f"down_blocks.{i}", down))
        elif i == block:  # its first `layer` resnets feed the running up layers
            out += pairs(f"down_blocks.{i}", down, range(layer, len(down.resnets)))
            out += [(f"down_blocks.{i}.downsamplers.{j}", m)
                    for j, m in enumerate(getattr(down, "downsamplers", None) or [])]
    if getattr(unet, "mid_block", None) is not None:
        out.append(("mid_block", unet.mid_block))
    out += [(f"up_blocks.{k}", ups[k]) for k in range(u)]
    out += pairs(f"up_blocks.{u}", ups[u], range(n_up - 1 - layer))
    return out


@dataclass
class _Gate:
    """Per denoiser call: full or cached (read by every ReplayHook), and what was measured."""

    tracker: StepTracker
    full_steps: object  # (num_steps) -> frozenset of full-step indices
    default_steps: int
    full: bool = True
    key: tuple | None = None
    calls: int = 0
    cached: int = 0

    def pre(self, module: nn.Module, args, kwargs) -> None:
        s = self.tracker.state
        key = (s.batch_size, s.latent_hw)
        scheduled = s.step_index in self.full_steps(s.num_steps or self.default_steps)
        self.full = scheduled or key != self.key
        if self.full:
            self.key = key
        p = next(module.parameters(), None)
        if p is None or p.device.type != "meta":  # FLOPs tools' meta calls are not generation
            self.calls += 1
            self.cached += not self.full


class DeepCache(RuntimeMethod):
    r"""DeepCache: reuse a UNet's deep up-path features for the steps between full steps.

    Important args:
        cache_interval (`int`, defaults to 3): N of DeepCache's 1:N strategy, one full step
            every N steps (1 = every step full, bit-identical to dense). The DeepCacheSDHelper
            example in DeepCache's README uses 3 (its SD1.5 pipeline example 5, SDXL 3).
        cache_block_id (`int`, defaults to 0), cache_layer_id (`int`, defaults to 0): the skip
            branch (module docstring). ``(0, 0)`` is the shallowest and cheapest: only
            ``conv_in`` and the last resnet (+ attention) of the last up block run on cached
            steps (the branch of every usage example in DeepCache's README). Deeper branches
            run more of the UNet and keep more quality.

    Args to tinker with:
        schedule (`str`, defaults to ``"uniform"``): ``uniform`` | ``non_uniform`` (same number
            of full steps, denser around ``center``; see ``edm.methods.cache.schedule``).
        center (`int`, defaults to 15), power (`float`, defaults to 1.4): the non-uniform
            schedule's centre step and exponent (DeepCache's ``center``/``pow``, defaults from
            its ``stable_diffusion.py``).
        name, tag: run bookkeeping.

    Steps are denoiser calls (``edm.state``): PNDM's extra first call and Heun's two calls per
    step each count.
    """

    is_cache = True

    supported_families = ("digits", "sd15", "sd21", "sdxl")

    def __init__(self, cache_interval: int = 3, cache_block_id: int = 0, cache_layer_id: int = 0,
                 schedule: str = "uniform", center: int = 15, power: float = 1.4,
                 name: str = "deepcache", tag: str | None = None):
        super().__init__()
        for key, v in (("cache_interval", cache_interval), ("cache_block_id", cache_block_id),
                       ("cache_layer_id", cache_layer_id), ("center", center)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"method.{key}", f"must be an int, got {v!r}.")
        if cache_interval < 1:
            raise ConfigError("method.cache_interval", f"{cache_interval}: must be >= 1.")
        if cache_block_id < 0 or cache_layer_id < 0:
            raise ConfigError("method.cache_block_id" if cache_block_id < 0 else
                              "method.cache_layer_id", "must be >= 0.")
        if schedule not in SCHEDULES:
            raise ConfigError("method.schedule", f"got {schedule!r}.", SCHEDULES)
        if center < 0:
            raise ConfigError("method.center", f"{center}: must be >= 0.")
        if not float(power) > 1:
            raise ConfigError("method.power", f"{power}: must be > 1.")
        self.cache_interval, self.cache_block_id, self.cache_layer_id = (
            cache_interval, cache_block_id, cache_layer_id)
        self.schedule, self.center, self.power = schedule, center, float(power)
        self.name = name
        self.tag = tag or f"deepcache-n{cache_interval}-b{cache_block_id}l{cache_layer_id}"
        self._gate: _Gate | None = None

    def full_steps(self, num_steps: int) -> frozenset[int]:
        return full_steps(self.schedule, num_steps, self.cache_interval, self.center, self.power)

    def install(self, pipe, patcher: Patcher, ctx: ApplyContext) -> MethodReport:
        unet = adapter(ctx.family).denoiser(pipe)
        if any(_HOOK in m._diffusers_hook.hooks for m in unet.modules()
               if hasattr(m, "_diffusers_hook")):
            raise RuntimeError("<method=deepcache> already applied by another DeepCache; "
                               "remove() it first")
        targets = cached_modules(unet, self.cache_block_id, self.cache_layer_id)
        steps = int(ctx.gen.get("num_inference_steps") or 0) or 25
        try:  # a bad non-uniform schedule fails here, not at step N of the first image
            planned = self.full_steps(steps)
        except ValueError as e:
            raise ConfigError("method.schedule", str(e)) from None
        tracker = StepTracker(unet, getattr(pipe, "scheduler", None))
        patcher.add_handle(tracker)
        gate = _Gate(tracker, lru_cache(maxsize=8)(self.full_steps), steps)
        # registered after the tracker's pre-hook, so it reads this call's step index
        patcher.add_handle(unet.register_forward_pre_hook(gate.pre, with_kwargs=True))
        for _, module in targets:
            patcher.register_hook(module, ReplayHook(gate), _HOOK)
        if not targets:
            raise NothingPatchedError("<method=deepcache> found nothing to cache in this UNet")
        self._gate = gate
        return MethodReport(
            name=self.name, kind=self.kind, patched=len(targets),
            metrics={"cache_interval": float(self.cache_interval),
                     "cache_block_id": float(self.cache_block_id),
                     "cache_layer_id": float(self.cache_layer_id),
                     "planned_cached_fraction": 1 - len(planned) / steps},
            details={"cached_modules": [n for n, _ in targets], "schedule": self.schedule,
                     "full_steps": sorted(planned), "num_inference_steps": steps})

    def run_metrics(self) -> dict[str, float]:
        """The fraction of generation's denoiser calls that ran cached (measured)."""
        g = self._gate
        if g is None or not g.calls:
            return {}
        return {"cached_call_fraction": g.cached / g.calls, "denoiser_calls": float(g.calls)}


__all__ = ["DeepCache", "cached_modules"]
