"""Learning-rate schedules usable from YAML (``model.init_args.scheduler``)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupLinear(LambdaLR):
    """Linear warmup from 0 then linear decay to 0 at the last training step.

    Args:
        optimizer: Set by the objective.
        warmup: Warmup length: a fraction of the run (< 1, e.g. 0.06) or a number of steps.
        total_steps: Length of the run; null takes ``trainer.estimated_stepping_batches``.
    """

    def __init__(self, optimizer: Optimizer, warmup: float = 0.06, total_steps: int | None = None):
        self.warmup, self.total_steps = warmup, total_steps
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        total = max(1, self.total_steps or 1)
        warm = self.warmup * total if self.warmup < 1 else self.warmup
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1.0, total - warm))
