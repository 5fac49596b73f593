"""Learning-rate schedules usable from YAML (``model.init_args.scheduler``)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupLinear(LambdaLR):
    """Linear warmup from 0 then linear decay to 0 at the last training step.

    Args:
        optimizer: Set by the objective.
        warmup: Warmup length: a fraction of the run (< 1, e.g. 0.06) or a number of steps.
        total_steps: Length of the run; null takes ``trainer.estimated_stepping_batches`` when
            training starts (set by the objective through ``set_total_steps``).
    """

    def __init__(self, optimizer: Optimizer, warmup: float = 0.06, total_steps: int | None = None):
        self.warmup, self.total_steps = warmup, total_steps
        super().__init__(optimizer, self._factor)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length and re-apply the learning rate of the current step."""
        self.total_steps = total_steps
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _factor(self, step: int) -> float:
        total = max(1, self.total_steps or 1)
        warm = self.warmup * total if self.warmup < 1 else self.warmup
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1.0, total - warm))
