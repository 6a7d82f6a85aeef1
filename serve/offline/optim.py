"""The optimiser every training command uses: AdamW without weight decay on biases and norms,
linear warm-up then linear decay to 0 (the schedule BERT-style fine-tuning expects)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads only when a command trains
    import torch

NO_DECAY = ("bias", "LayerNorm", "norm")


def decay_groups(
    model: torch.nn.Module, weight_decay: float, skip: Callable[[str], bool] = lambda n: False
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters (not those `skip` names): weight
    decay except on biases and norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not skip(n)]
    return [
        {
            "params": [p for n, p in named if not any(k in n for k in NO_DECAY)],
            "weight_decay": weight_decay,
        },
        {"params": [p for n, p in named if any(k in n for k in NO_DECAY)], "weight_decay": 0.0},
    ]


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over `warmup` (a fraction of `total`) steps, then linear decay to 0."""
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / max(1, warm)
    return max(0.0, (total - step) / max(1, total - warm))


def adamw_with_warmup(
    model: torch.nn.Module, lr: float, total_steps: int, warmup: float, weight_decay: float = 0.01
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    import torch

    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup))
    return opt, sched
