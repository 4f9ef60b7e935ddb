"""Loop counts for training steps: a random count per optimizer step, a function of ``(seed, step)``.

Training at many loop counts teaches an implicit model to settle rather than to stop at one depth;
a heavy tail of large counts (with gradients through the last few iterations only, so their cost
stays bounded) is what lets it keep improving, then stay stable, past its training counts.

* ``uniform``: a count drawn uniformly from ``[min, max]``;
* ``poisson_lognormal`` (recurrent-depth training, Geiping et al. 2025): a rate
  ``τ ~ LogNormal(log(mean) - sigma²/2, sigma)`` (so ``E[τ] = mean``), then ``Poisson(τ)``, clipped to
  ``[min, max]``: most steps near the mean, a heavy tail of deep ones.

* ``above_difficulty``: tied to the batch: ``d + U[1, 1 + round(extra * d)]`` for a batch whose hardest row
  has difficulty ``d`` (the task's `difficulty`, e.g. the number of state-tracking steps), clipped to
  ``[min, max]``: always a few loops more than the row needs, never a fixed depth per length.
  ``extra = 1`` draws ``d + U[1, d + 1]``; ``extra = 0`` ties the count to the difficulty (``d + 1``).
  With ``group_by_difficulty`` batches (the recipe key), every batch is one difficulty.

``ramp_steps`` raises the mean linearly from ``min`` to ``mean`` over the first ``ramp_steps`` steps
(for ``uniform``, the upper end rises from ``min`` to ``max``), so early training is shallow and cheap.
Every draw depends on ``(seed, step)`` only (and, above the difficulty, on the batch's difficulty and
its place among the step's micro-batches): the same on every process for the same batch, and a
resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Annotated

import numpy as np

from ..checks import Positive, at_least, number
from ..loop_counts import check_loop_bound
from .fields import check_fields, choice

DISTRIBUTIONS = ("uniform", "poisson_lognormal", "above_difficulty")
# a setting -> the distributions it applies to (left at its default for the others)
APPLIES_TO = {
    "mean": ("poisson_lognormal",),
    "ramp_steps": ("uniform", "poisson_lognormal"),
    "extra": ("above_difficulty",),
}


@dataclass(frozen=True)
class LoopSchedule:
    """A loop-count distribution for training steps (see the module docstring); each field declares what it takes."""

    distribution: Annotated[str, choice(DISTRIBUTIONS)] = "uniform"
    min: Annotated[int, at_least(1)] = 1
    max: Annotated[int, at_least(1)] = 8
    mean: float | None = None  # poisson_lognormal: in [min, max]
    sigma: Positive = 0.5
    ramp_steps: Annotated[int, at_least(0)] = 0
    extra: Annotated[float, number(">= 0", lambda value: value >= 0)] | None = None

    def __post_init__(self) -> None:
        check_fields(self, lambda key: f"loop_schedule.{key}")
        if self.min > self.max:
            raise ValueError(f"loop_schedule needs min <= max; got min={self.min}, max={self.max}")
        check_loop_bound("loop_schedule.max", self.max)
        for spec in fields(self):
            used_by = APPLIES_TO.get(spec.name, DISTRIBUTIONS)
            if self.distribution not in used_by and getattr(self, spec.name) != spec.default:
                raise ValueError(f"loop_schedule.{spec.name} applies to {' and '.join(used_by)} only")
        if self.distribution == "poisson_lognormal" and not (
            self.mean is not None and self.min <= self.mean <= self.max
        ):
            raise ValueError(
                f"loop_schedule.mean must be a number in [min, max] = [{self.min}, {self.max}] for "
                f"poisson_lognormal; got {self.mean!r}"
            )

    @property
    def needs_difficulty(self) -> bool:
        """Whether a draw needs the batch's difficulty (`sample`'s ``difficulty``)."""
        return self.distribution == "above_difficulty"

    def current_mean(self, step: int) -> float:
        """The mean loop count at ``step`` (after the ramp: ``mean``, or ``(min + max) / 2`` for uniform)."""
        target = self.mean if self.distribution == "poisson_lognormal" else (self.min + self.max) / 2
        return self.min + (target - self.min) * self._ramp(step)

    def _ramp(self, step: int) -> float:
        return 1.0 if self.ramp_steps == 0 else min(1.0, step / self.ramp_steps)

    def sample(self, seed: int, step: int, difficulty: int | None = None, micro_batch: int = 0) -> int:
        """The loop count of optimizer step ``step`` (0-based) of a run seeded ``seed``; ``above_difficulty`` also
        takes the batch's ``difficulty`` and the micro-batch's index within the step (each draws its own)."""
        if self.needs_difficulty:
            if difficulty is None:
                raise ValueError("an above_difficulty loop schedule needs the batch's difficulty")
            extra = 1.0 if self.extra is None else self.extra
            draw = random.Random(f"above_difficulty/{seed}/{step}/{micro_batch}").randint(
                1, 1 + round(extra * difficulty)
            )
            return min(max(difficulty + draw, self.min), self.max)
        if self.distribution == "uniform":
            high = self.min + round((self.max - self.min) * self._ramp(step))
            # seeded as the former ``random_loops`` key was, so its runs draw the same counts
            return random.Random(f"random_loops/{seed}/{step}").randint(self.min, high)
        rng = np.random.default_rng([seed, step, 0x100B5])
        mean = self.current_mean(step)
        rate = rng.lognormal(math.log(mean) - self.sigma**2 / 2, self.sigma)
        return int(np.clip(rng.poisson(rate), self.min, self.max))
