"""Early stopping: end the optimisation once its loss has stopped improving.

The loss of a protection is noisy (every step draws its own timestep and noise), so
the rule watches an exponential moving average of it. After step ``t`` it compares
what the best smoothed loss gained over the last ``patience`` steps with what it has
gained since the first step, and stops when the recent gain is at most ``tolerance``
of the total: on a plateau the recent gain is about nothing, while a loss that still
falls steadily gains ``patience / t`` of its total per window. Nothing stops before
``2 * patience`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class EarlyStop:
    """Decides, step by step, whether a minimised loss has stopped improving.

    Args:
        patience: window in steps (0 turns early stopping off).
        tolerance: share of the run's total gain below which a window counts as flat.
        smoothing: decay of the moving average of the loss.
    """

    patience: int
    tolerance: float = 0.02
    smoothing: float = 0.8
    _average: float | None = field(default=None, init=False)
    _first: float = field(default=math.nan, init=False)
    _best: list[float] = field(default_factory=list, init=False)

    def update(self, loss: float) -> bool:
        """Record one step's loss; True when the run should stop after this step."""
        if self._average is None:
            self._average = self._first = loss
        else:
            self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        self._best.append(min(self._average, self._best[-1]) if self._best else self._average)
        if not self.patience or len(self._best) < 2 * self.patience:
            return False
        recent = self._best[-1 - self.patience] - self._best[-1]
        total = self._first - self._best[-1]
        return recent <= self.tolerance * max(total, 0.0)

    def replay(self, losses: Iterable[float]) -> bool:
        """Feed the losses of steps already done (a resumed run); True when the run had decided to
        stop after the last of them (its checkpoint was saved at the step it stopped on)."""
        stop = False
        for loss in losses:
            stop = self.update(loss)
        return stop
