"""Which denoiser calls of a trajectory run the whole UNet (DeepCache's "1:N" strategies).

Pure functions of ``(num_steps, interval, ...)``; no model code. Step 0 is always a full step
(the cache is empty before it).

* **uniform** (DeepCache §3.3): a full step every ``interval`` steps, ``{0, N, 2N, ...}``.
* **non-uniform** (DeepCache's ``uniform=False``): the same number of full steps,
  ``ceil(num_steps / N)``, placed densest around step ``center`` and sparser away from it, by
  spacing them evenly in ``u`` and mapping ``step = center + sign(u) |u|^power``. The reference
  (``sample_from_quad_center`` in horseee/DeepCache) raises the negative end ``-center`` to the
  fractional power ``1/pow``, which numpy evaluates as a complex number whose real part it then
  keeps; that gives a differently shaped schedule ([0, 5, 9, 13, 17, 21, 26, 31, 37, 43] for 50
  steps, N=5, center 15, pow 1.4, against ours [0, 5, 10, 13, 15, 19, 24, 29, 35, 42]). We use
  the symmetric real mapping the paper describes (denser sampling where features change fastest)
  and keep the reference's rule of lowering ``power`` by 0.02 until the steps are distinct.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("uniform", "non_uniform")


def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
    return list(range(0, num_steps, interval))


def non_uniform_full_steps(num_steps: int, interval: int, center: int, power: float) -> list[int]:
    """``ceil(num_steps / interval)`` distinct full steps, densest around ``center``.

    Raises ``ValueError`` when no ``power`` > 1 gives that many distinct steps (too many full
    steps for the trajectory, or ``center`` at its very end).
    """
    n = math.ceil(num_steps / interval)
    if n >= num_steps:
        return list(range(num_steps))
    center = min(max(int(center), 0), num_steps - 1)
    p = float(power)
    while p > 1:
        u = np.linspace(-(center ** (1 / p)), (num_steps - center) ** (1 / p), n + 1)
        steps = center + np.sign(u) * np.abs(u) ** p
        # the last point is the trajectory's end (num_steps), not a step; 0 is always full
        picked = sorted({0} | {int(s) for s in np.floor(steps[:-1] + 1e-9)})
        if len(picked) == n and picked[-1] < num_steps:
            return picked
        p -= 0.02
    raise ValueError(
        f"no non-uniform schedule with {n} distinct full steps in {num_steps} (center {center}, "
        f"power {power}); lower the interval or move the center"
    )


def full_steps(schedule: str, num_steps: int, interval: int, center: int = 15,
               power: float = 1.4) -> frozenset[int]:
    """The set of full-step indices of a ``num_steps``-call trajectory."""
    if interval == 1:
        return frozenset(range(num_steps))
    if schedule == "uniform":
        return frozenset(uniform_full_steps(num_steps, interval))
    return frozenset(non_uniform_full_steps(num_steps, interval, center, power))
