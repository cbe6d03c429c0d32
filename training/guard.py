"""The non-finite guard every training loop here runs under: a NaN/Inf step is skipped, and too many in a row stop
the run with its last checkpoint intact."""
from __future__ import annotations

from typing import Callable

from configs.errors import UserError


class TrainingDiverged(UserError):
    """Too many NaN/Inf losses in a row; the last good checkpoint is left as it was."""


class NonFiniteGuard:
    """Counts skipped steps in a row. `where` names the folder of the last checkpoint, `advice` what to change."""

    def __init__(self, max_bad_steps: int, log: Callable[[str], None], where, advice: str):
        self.max_bad_steps, self.log, self.where, self.advice = max_bad_steps, log, where, advice
        self.bad_steps = 0

    def check(self, finite: bool, step: int) -> bool:
        """Whether the step at `step` counts; warns on a skipped one and raises TrainingDiverged at the limit."""
        if finite:
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        self.log(f"warning: non-finite loss at step {step}; step skipped "
                 f"({self.bad_steps}/{self.max_bad_steps} in a row)")
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(f"training diverged: {self.bad_steps} non-finite losses in a row at step {step}; "
                                   f"the last checkpoint in {self.where} is intact; {self.advice}")
        return False
