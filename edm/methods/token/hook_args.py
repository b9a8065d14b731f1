"""Plumbing shared by the token methods' hooks: the hidden-state argument and the trajectory RNG.

Diffusers calls transformer layers and attention modules with ``hidden_states`` either first
positionally or as a keyword; hooks read and replace it without caring which.
"""

from __future__ import annotations

import torch

from edm.state import StepTracker


def hidden_arg(args: tuple, kwargs: dict, name: str = "hidden_states") -> torch.Tensor:
    return args[0] if args else kwargs[name]


def with_hidden(args: tuple, kwargs: dict, value, name: str = "hidden_states"):
    """``(args, kwargs)`` with the hidden-state argument replaced by ``value``."""
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, name: value}


class TrajectoryRNG:
    """Random draws of a token method, reproducible per image.

    With a ``seed`` the generator is re-seeded at the first draw of every trajectory (a pipeline
    call), keyed by the trajectory rather than by step 0 (DSAP may draw nothing at step 0), so an
    image does not depend on the batches before it and resumed or sharded generation reproduces
    it. ``seed=None`` is tomesd's behaviour: a fork of the device's global RNG taken at first use
    and drawn from ever after. Draws happen on the activations' device (CPU for meta/mps).
    """

    def __init__(self, tracker: StepTracker, seed: int | None):
        self.tracker, self.seed = tracker, seed
        self.generator: torch.Generator | None = None
        self.seeded_for = -1  # the trajectory (its first call's number) it was seeded for

    def generator_for(self, device: torch.device) -> torch.Generator:
        dev = device if device.type in ("cpu", "cuda") else torch.device("cpu")
        if self.seed is not None:
            state = self.tracker.state
            trajectory = state.calls - max(state.step_index, 0)
            if self.generator is None or self.generator.device != dev or \
                    trajectory != self.seeded_for:
                self.generator = torch.Generator(dev).manual_seed(self.seed)
                self.seeded_for = trajectory
        elif self.generator is None or self.generator.device != dev:
            self.generator = torch.Generator(dev)
            rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else torch.get_rng_state()
            self.generator.set_state(rng)
        return self.generator
