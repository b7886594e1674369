"""Learning-rate schedules, as configs build them (``conf/module/default.yaml``: ``module.scheduler``, a ``_partial_``
that the module completes with the optimizer and the run's number of steps)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def step_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, milestones: Sequence[float] = (0.9, 0.95),
                     gamma: float = 0.1, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The paper's schedule (SPEC.md section 4), stepped every optimizer step: the lr times ``gamma`` at each
    milestone (a fraction of ``total_steps``), after a linear warm-up from 1% over ``warmup_steps`` steps."""
    steps = [int(fraction * max(1, int(total_steps))) for fraction in milestones]

    def factor(step: int) -> float:
        scale = gamma ** sum(step >= m for m in steps)
        if warmup_steps and step < warmup_steps:
            scale *= 0.01 + 0.99 * step / warmup_steps
        return scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
