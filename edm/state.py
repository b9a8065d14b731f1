"""Per-trajectory denoiser state, tracked without globals.

``StepTracker`` is a forward pre-hook on the denoiser (``pipe.unet`` or ``pipe.transformer``).
It binds the call's arguments by signature, because Stable Diffusion pipelines pass the timestep
positionally (``unet(latents, t, ...)``) and SD3 passes it by keyword (``transformer(timestep=t)``),
and records the step index, the timestep, the batch size and the latent grid.

Step index semantics: the number of denoiser calls since the trajectory started, 0 for the first
(noisiest) call. With classifier-free guidance the pipelines of this project batch the
unconditional and conditional halves into one call, so one call == one denoising step. A new
trajectory starts when the tracker sees the scheduler's first timestep again, or a timestep larger
than the previous call's, or after ``reset()``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

_TIMESTEP_NAMES = ("timestep", "t")
_SAMPLE_NAMES = ("sample", "hidden_states", "x")


@dataclass
class DenoiserState:
    """What the methods need to know about the current denoiser call."""

    step_index: int = -1
    timestep: float | None = None
    num_steps: int | None = None
    batch_size: int = 0
    latent_hw: tuple[int, int] | None = None
    calls: int = 0  # total calls seen (all trajectories), useful for tests
    history: list[int] = field(default_factory=list)  # step indices seen, bounded by reset()

    def reset(self) -> None:
        self.step_index = -1
        self.timestep = None
        self.history.clear()


class StepTracker:
    """Installs a pre-forward hook that keeps a :class:`DenoiserState` up to date.

    Args:
        denoiser: the UNet or MMDiT module the pipeline calls once per step.
        scheduler: the pipeline's scheduler; its ``timesteps`` tell where a trajectory starts
            and how long it is. Optional: without it only ``reset()`` starts a trajectory.
    """

    def __init__(self, denoiser: nn.Module, scheduler=None):
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.state = DenoiserState()
        self._sig = inspect.signature(denoiser.forward)
        self._handle = denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _bind(self, args, kwargs):
        try:
            bound = self._sig.bind_partial(*args, **kwargs)
        except TypeError:
            return None, None
        sample = next((bound.arguments[n] for n in _SAMPLE_NAMES if n in bound.arguments), None)
        t = next((bound.arguments[n] for n in _TIMESTEP_NAMES if n in bound.arguments), None)
        return sample, t

    def _pre_hook(self, module, args, kwargs):
        sample, t = self._bind(args, kwargs)
        s = self.state
        if torch.is_tensor(t):
            # a meta tensor (FLOPs counting of full-size models) has no value: steps then
            # only count up from the first call (or from reset())
            t_val = None if t.device.type == "meta" else float(t.flatten()[0])
        else:
            t_val = float(t) if t is not None else None
        timesteps = getattr(self.scheduler, "timesteps", None)
        first_t = float(timesteps[0]) if timesteps is not None and len(timesteps) else None
        # Timesteps never increase along a trajectory (PNDM and Heun repeat one), so a larger
        # one starts the next trajectory. That rule also holds where the pipeline rescales the
        # timestep it passes (FLUX.1 calls the transformer with t / 1000, which never equals
        # ``scheduler.timesteps[0]``).
        rises = t_val is not None and s.timestep is not None and t_val > s.timestep
        starts = s.step_index < 0 or rises or (
            first_t is not None and t_val == first_t and s.timestep != first_t
        )
        if starts:
            s.reset()
            s.step_index = 0
        else:
            s.step_index += 1
        s.timestep = t_val
        s.num_steps = len(timesteps) if timesteps is not None else None
        s.calls += 1
        s.history.append(s.step_index)
        if torch.is_tensor(sample) and sample.dim() == 4:
            s.batch_size = int(sample.shape[0])
            s.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        return None

    def reset(self) -> None:
        self.state.reset()

    def remove(self) -> None:
        self._handle.remove()
