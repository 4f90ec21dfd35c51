"""Learning-rate schedule: linear warm-up, then cosine decay to zero (a pure function)."""

import math


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): warm-up reaches base_lr at step warmup_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
