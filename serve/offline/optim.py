"""The optimiser every training command uses: AdamW without weight decay on biases and norms,
linear warm-up then linear decay to 0 (the schedule BERT-style fine-tuning expects)."""

from __future__ import annotations

from typing import Any

import torch


def adamw_with_warmup(
    model: torch.nn.Module, lr: float, total_steps: int, warmup: float, weight_decay: float = 0.01
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """`warmup` is a fraction of `total_steps`; only parameters that require grad train."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = [p for n, p in named if any(k in n for k in ("bias", "LayerNorm", "norm"))]
    decay = [p for n, p in named if not any(k in n for k in ("bias", "LayerNorm", "norm"))]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    warm = int(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / max(1, warm)
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
