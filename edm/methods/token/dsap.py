"""DSAP: Denoising-Steps-Aware Pruning (AT-EDM, spec §1.6), shared by AT-EDM and ToMe.

The attention maps of the first (noisiest) denoising steps are less informative and the layout
forms there, so during the first ``tau`` steps some attention blocks are left unpruned and the
others may prune less; afterwards every block prunes at the full ratio. The paper's schedule
(from secondary sources, spec §1.6 [S]): leave the first attention block of every down stage
and the last attention block of every up stage unpruned early. ``tau`` and whether the mid
block counts are unknown, so both are knobs.

The schedule is a pure function of ``(block, step_index, num_steps)``; the step index comes from
:class:`edm.state.StepTracker` (0 = first, noisiest step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edm.errors import ConfigError
from edm.families import AttentionBlock

BLOCK_RULES = ("first_down_last_up", "first_down_last_up_mid", "none", "all")
# Transformer stages: no down/up/mid structure, so the UNet rules exempt none of their blocks.
_DIT_STAGES = ("joint", "double", "single")


class DSAP:
    """Denoising-steps-aware pruning schedule.

    Args:
        enabled (`bool`, defaults to `True`): off = every step uses the base ratio.
        early_steps (`int | float`, defaults to `0.1`): the early phase ``tau``. An int >= 0 is a
            number of steps; a float in (0, 1) is a fraction of the trajectory's steps
            (rounded to the nearest step). Not recovered from the paper (the spec suggests
            10-40 %); 0.1 makes AT-EDM's average SD-XL FLOPs match both of the paper's
            budgets (4.1 T, and 4.5 T without 64x64 pruning), 0.2 overshoots them by 2-3 %.
        block_rule (`str`, defaults to `"first_down_last_up"`): which attention blocks are left
            unpruned while early. ``first_down_last_up``: the first block of each UNet down stage
            and the last of each up stage (paper, spec §1.6); ``first_down_last_up_mid``: also the
            mid block (unknown in the paper); ``none``: no block is exempt (only
            ``early_prune_ratio`` acts); ``all``: nothing is pruned early. MMDiT and FLUX blocks
            (stages ``joint``, ``double``, ``single``) are never exempt by the first two rules.
        early_prune_ratio (`float | None`, defaults to `None`): ratio of the non-exempt blocks
            while early; ``None`` keeps the base ratio there ("prune less" then comes only from
            the exempt blocks).
        key (`str`): config key prefix used in error messages.
    """

    def __init__(
        self,
        enabled: bool = True,
        early_steps: float = 0.1,
        block_rule: str = "first_down_last_up",
        early_prune_ratio: float | None = None,
        key: str = "method.dsap",
    ):
        self.enabled = bool(enabled)
        if isinstance(early_steps, bool) or not isinstance(early_steps, (int, float)):
            raise ConfigError(f"{key}.early_steps", f"must be a number, got {early_steps!r}.")
        if isinstance(early_steps, float) and not 0.0 <= early_steps < 1.0:
            if early_steps.is_integer() and early_steps >= 1:
                early_steps = int(early_steps)  # 10.0 from a sweep means 10 steps
            else:
                raise ConfigError(
                    f"{key}.early_steps",
                    f"a float is a fraction of the steps, in [0, 1); got {early_steps}.",
                )
        if isinstance(early_steps, int) and early_steps < 0:
            raise ConfigError(f"{key}.early_steps", f"must be >= 0, got {early_steps}.")
        if block_rule not in BLOCK_RULES:
            raise ConfigError(f"{key}.block_rule", f"unknown rule {block_rule!r}.", BLOCK_RULES)
        if early_prune_ratio is not None and not 0.0 <= float(early_prune_ratio) <= 1.0:
            raise ConfigError(
                f"{key}.early_prune_ratio", f"must be in [0, 1] or null, got {early_prune_ratio}."
            )
        self.early_steps = early_steps
        self.block_rule = block_rule
        self.early_prune_ratio = None if early_prune_ratio is None else float(early_prune_ratio)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | DSAP | None, key: str = "method.dsap") -> DSAP:
        """From a YAML node (``dict``/``DictConfig``); ``DSAP`` passes, ``None`` = off."""
        if isinstance(cfg, DSAP):
            return cfg
        if cfg is None:
            return cls(enabled=False, key=key)
        known = {"enabled", "early_steps", "block_rule", "early_prune_ratio"}
        extra = set(cfg) - known
        if extra:
            raise ConfigError(f"{key}", f"unknown keys {sorted(extra)}.", sorted(known))
        return cls(**{k: cfg[k] for k in cfg}, key=key)

    def tau(self, num_steps: int | None) -> int:
        """Number of early steps of a ``num_steps`` trajectory (0 when it cannot be known)."""
        if isinstance(self.early_steps, int):
            return self.early_steps
        if num_steps is None:  # a fraction of an unknown trajectory: no early phase
            return 0
        return round(self.early_steps * num_steps)

    def is_early(self, step_index: int, num_steps: int | None) -> bool:
        """Whether ``step_index`` (0 = first step; -1 = unknown) is in the early phase."""
        return self.enabled and 0 <= step_index < self.tau(num_steps)

    def exempt(self, block: AttentionBlock) -> bool:
        """Whether ``block`` is left unpruned during the early phase."""
        rule = self.block_rule
        if rule == "all":
            return True
        if rule == "none" or block.stage in _DIT_STAGES:
            return False
        if block.stage == "down":
            return block.position == 0
        if block.stage == "up":
            return block.position == block.stage_len - 1
        return rule == "first_down_last_up_mid"  # mid block

    def ratio(
        self, base_ratio: float, block: AttentionBlock, step_index: int, num_steps: int | None
    ) -> float:
        """The pruning (or merge) ratio of ``block`` at ``step_index``."""
        if not self.is_early(step_index, num_steps):
            return base_ratio
        if self.exempt(block):
            return 0.0
        return base_ratio if self.early_prune_ratio is None else self.early_prune_ratio

    def __repr__(self) -> str:
        if not self.enabled:
            return "DSAP(enabled=False)"
        return (
            f"DSAP(early_steps={self.early_steps}, block_rule={self.block_rule}, "
            f"early_prune_ratio={self.early_prune_ratio})"
        )
