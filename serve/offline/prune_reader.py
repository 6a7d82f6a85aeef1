"""`qaserve prune-reader`: sparsify the reader while fine-tuning it, three ways.

- `--method magnitude` (Zhu & Gupta 2017): every `--prune-every` steps each linear layer of
  the encoder keeps its largest |w|; the sparsity follows the cubic schedule
  s_t = s_f * (1 - (1 - (t - t0) / (t1 - t0))^3) from t0 to t1, then stays at s_f;
- `--method movement` (Sanh et al. 2020, hard top-k): each weight has a learned score; the
  forward pass uses W * TopK(scores) with a straight-through gradient, so the scores learn
  which weights move away from zero; same cubic schedule, masks applied every step;
- `--structured ffn --fraction f`: at one step, each layer's FFN keeps the (1-f) neurons with
  the largest first-order importance |sum a * dL/da| accumulated since training began, and
  both FFN matrices really shrink (config.intermediate_size follows), so the exported ONNX
  graph does less work. Heads are not offered: transformers 5 dropped `pruned_heads`, so a
  head-pruned BERT no longer reloads with from_pretrained and cannot go through the export.

Unstructured zeros do not make ONNX Runtime faster (its MatMul kernels are dense); they
only make the weights compress, which train_log.json reports beside the sparsity. The best
dev checkpoint is chosen only among evaluations at full target sparsity; it is saved with
the masks materialised as zeros, a plain checkpoint the export path takes unchanged.
An optional `--teacher` adds the distillation loss, as Sanh et al. train.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qaserve.offline.command import Command
from qaserve.offline.distill_reader import (
    add_loop_args,
    batch_loss,
    encoder_layers,
    ensemble_logits,
    loop_config,
    prepare_data,
    training_windows,
)
from qaserve.offline.reader_loop import LoopConfig, Run, train_loop

log = logging.getLogger(__name__)


def cubic_sparsity(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual schedule: `initial` until `start`, `final` from `end` on."""
    if step <= start:
        return initial
    if step >= end:
        return final
    return final + (initial - final) * (1.0 - (step - start) / (end - start)) ** 3


def top_mask(values: Any, sparsity: float) -> Any:
    """1 for the largest (1 - sparsity) share of `values` (exact count), else 0."""
    import torch

    n = values.numel()
    keep = n - round(sparsity * n)
    mask = torch.zeros(n, dtype=values.dtype, device=values.device)
    if keep > 0:
        mask[torch.topk(values.flatten(), keep, sorted=False).indices] = 1.0
    return mask.view_as(values)


def encoder_linears(model: Any) -> dict[str, Any]:
    """The linear layers inside the transformer layers (not embeddings, pooler or QA head)."""
    import torch

    out = {}
    for i, layer in enumerate(encoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"layer.{i}.{name}"] = module
    return out


def sparsity_report(model: Any) -> dict[str, Any]:
    """Share of zero weights in the encoder's linear layers (masks applied)."""
    zeros = total = 0
    per: dict[str, float] = {}
    for name, lin in encoder_linears(model).items():
        w = lin.effective_weight() if isinstance(lin, _masked_linear_type()) else lin.weight
        z = int((w == 0).sum())
        per[name] = round(z / w.numel(), 4)
        zeros, total = zeros + z, total + w.numel()
    return {"sparsity": round(zeros / max(1, total), 4), "pruned_weights": total, "per_layer": per}


# --- magnitude ---------------------------------------------------------------------------


class Magnitude:
    """Per-layer magnitude masks on the cubic schedule; re-applied after each step."""

    def __init__(self, model: Any, final: float, start: int, end: int, every: int) -> None:
        self.linears = encoder_linears(model)
        self.final, self.start, self.end, self.every = final, start, end, max(1, every)
        self.masks: dict[str, Any] = {}
        self.level = 0.0

    def after_step(self, model: Any, step: int) -> None:
        import torch

        self.linears = encoder_linears(model)  # a structured cut may have replaced some
        due = step > self.start and ((step - self.start) % self.every == 0 or step == self.end)
        if due and step <= self.end:
            self.level = cubic_sparsity(step, self.final, self.start, self.end)
        with torch.no_grad():
            for name, lin in self.linears.items():
                mask = self.masks.get(name)
                if (due and step <= self.end) or (
                    mask is not None and mask.shape != lin.weight.shape
                ):
                    self.masks[name] = top_mask(lin.weight.abs(), self.level)
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.linears[name].weight.mul_(mask)

    def state(self) -> dict[str, Any]:
        return {"masks": self.masks, "level": self.level}

    def restore(self, model: Any, state: dict[str, Any]) -> Any:
        self.masks, self.level = state.get("masks", {}), state.get("level", 0.0)
        return model


# --- movement ----------------------------------------------------------------------------

_MASKED_LINEAR: Any = None


def _masked_linear_type() -> Any:
    """nn.Linear with learned scores and a top-k mask (built lazily: torch loads late)."""
    global _MASKED_LINEAR
    if _MASKED_LINEAR is not None:
        return _MASKED_LINEAR
    import torch
    import torch.nn.functional as F

    class TopK(torch.autograd.Function):
        """Forward: the top-k mask of the scores. Backward: straight through."""

        @staticmethod
        def forward(ctx: Any, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
            return top_mask(scores, sparsity)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return grad, None

    class MaskedLinear(torch.nn.Linear):
        """Uses weight * TopK(scores); dL/dscores = dL/d(weight*mask) * weight (Sanh et al.)."""

        sparsity: float = 0.0

        def mask(self) -> torch.Tensor:
            return TopK.apply(self.scores, self.sparsity)

        def effective_weight(self) -> torch.Tensor:
            return self.weight * self.mask()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.effective_weight(), self.bias)

    _MASKED_LINEAR = MaskedLinear
    return MaskedLinear


class Movement:
    """Swaps the encoder's linear layers for MaskedLinear and drives their sparsity."""

    def __init__(self, model: Any, final: float, start: int, end: int) -> None:
        import torch

        cls = _masked_linear_type()
        self.final, self.start, self.end = final, start, end
        self.layers = []
        for module in list(encoder_layers(model).modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear:
                    masked = cls(child.in_features, child.out_features, child.bias is not None)
                    masked.weight, masked.bias = child.weight, child.bias
                    masked.scores = torch.nn.Parameter(torch.zeros_like(child.weight))
                    setattr(module, name, masked)
                    self.layers.append(masked)

    def set_step(self, model: Any, step: int) -> None:
        level = cubic_sparsity(step, self.final, self.start, self.end)
        for layer in self.layers:
            layer.sparsity = level

    def param_groups(self, scores_lr: float) -> list[dict[str, Any]]:
        return [{"params": [m.scores for m in self.layers], "lr": scores_lr, "weight_decay": 0.0}]

    def save(self, model: Any, dest: Path) -> None:
        """A plain checkpoint: masked weights as zeros, no scores."""
        import torch

        with torch.no_grad():
            masked = {id(m.weight): m.effective_weight() for m in self.layers}
            by_name = dict(model.named_parameters())
            state = {
                k: masked.get(id(by_name.get(k)), v) if k in by_name else v
                for k, v in model.state_dict().items()
                if not k.endswith(".scores")
            }
        model.save_pretrained(dest, state_dict={k: v.contiguous() for k, v in state.items()})


# --- structured: FFN neurons -------------------------------------------------------------


class FFNCut:
    """Accumulates each FFN neuron's |sum a * dL/da| until `at`, then shrinks every layer's FFN
    to the same number of neurons (so config.intermediate_size describes the result)."""

    def __init__(self, model: Any, fraction: float, at: int) -> None:
        import torch

        self.fraction, self.at = fraction, at
        self.layers = list(encoder_layers(model))
        for layer in self.layers:
            if not (hasattr(layer, "intermediate") and hasattr(layer, "output")):
                raise ValueError("--structured ffn needs a BERT-like layer (intermediate/output)")
        size = self.layers[0].intermediate.dense.out_features
        self.importance = [torch.zeros(size) for _ in self.layers]
        self.plan: list[list[int]] | None = None
        self.hooks = [
            layer.intermediate.register_forward_hook(self._hook(i))
            for i, layer in enumerate(self.layers)
        ]

    def _hook(self, i: int) -> Any:
        def hook(module: Any, inputs: Any, out: Any) -> None:
            if out.requires_grad:
                act = out.detach()

                def accumulate(grad: Any) -> None:  # returns None: the gradient is unchanged
                    self.importance[i] += (act * grad).sum(1).abs().sum(0).float()

                out.register_hook(accumulate)

        return hook

    def before_step(self, model: Any, step: int) -> bool:
        if self.plan is not None or step < self.at:
            return False
        import torch

        keep = self.layers[0].intermediate.dense.out_features - round(
            self.fraction * self.layers[0].intermediate.dense.out_features
        )
        plan = []
        for layer, score in zip(self.layers, self.importance, strict=True):
            if not bool(score.any()):  # nothing accumulated yet: weight magnitude instead
                score = layer.intermediate.dense.weight.norm(
                    dim=1
                ) * layer.output.dense.weight.norm(dim=0)
            plan.append(sorted(torch.topk(score, keep).indices.tolist()))
        self.apply(model, plan)
        return True

    def apply(self, model: Any, plan: list[list[int]]) -> None:
        import torch

        for h in self.hooks:
            h.remove()
        self.hooks = []
        with torch.no_grad():
            for layer, keep in zip(self.layers, plan, strict=True):
                idx = torch.tensor(keep)
                up, down = layer.intermediate.dense, layer.output.dense
                new_up = torch.nn.Linear(up.in_features, len(keep))
                new_up.weight.copy_(up.weight[idx])
                new_up.bias.copy_(up.bias[idx])
                new_down = torch.nn.Linear(len(keep), down.out_features)
                new_down.weight.copy_(down.weight[:, idx])
                new_down.bias.copy_(down.bias)
                layer.intermediate.dense, layer.output.dense = new_up, new_down
        model.config.intermediate_size = len(plan[0])
        self.plan = plan

    def state(self) -> dict[str, Any]:
        return {"plan": self.plan, "importance": self.importance}

    def restore(self, model: Any, state: dict[str, Any]) -> Any:
        if state.get("importance") is not None:
            self.importance = state["importance"]
        if state.get("plan") is not None:
            self.apply(model, state["plan"])
        return model


# --- the command -------------------------------------------------------------------------


def compressed_size(folder: Path) -> dict[str, int]:
    """Bytes of model.safetensors as stored and deflated: what unstructured zeros buy."""
    data = (folder / "model.safetensors").read_bytes()
    return {"safetensors_bytes": len(data), "zlib_bytes": len(zlib.compress(data, 6))}


def prune_reader(
    train_files: Sequence[Path],
    dev_files: Sequence[Path],
    output_dir: Path,
    cfg: LoopConfig,
    *,
    model_from: str | None = None,
    method: str | None = "magnitude",
    sparsity: float = 0.5,
    prune_start: float = 0.1,
    prune_end: float = 0.7,
    prune_every: int = 10,
    scores_lr: float = 1e-2,
    structured: str | None = None,
    fraction: float = 0.25,
    cut_at: float = 0.1,
    teachers: Sequence[str | Path] = (),
    alpha: float = 1.0,
    temperature: float = 2.0,
    cache_dir: Path | None = None,
    threads: int | None = None,
    stop_after: int | None = None,
    fresh: bool = False,
    progress: bool = True,
    log_every: int = 10,
) -> dict[str, Any]:
    """Fine-tune `model_from` (default: the packaged MiniLM) while pruning; OUTPUT/best."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from qaserve.config import default_cache_dir, packaged_embedder
    from qaserve.offline.distill_reader import load_student
    from qaserve.threads import bound_threads

    if method not in (None, "magnitude", "movement") or structured not in (None, "ffn"):
        raise ValueError("--method is magnitude or movement; --structured is ffn")
    if method is None and structured is None:
        raise ValueError("nothing to do: give --method and/or --structured")
    if not 0.0 <= sparsity < 1.0 or not 0.0 < fraction < 1.0:
        raise ValueError("need 0 <= sparsity < 1 and 0 < fraction < 1")
    n_threads = bound_threads(threads)
    source = model_from or packaged_embedder()
    model, tokenizer = load_student(source, None, cfg.seed)
    train_feats, dev_feats, dev_ex, masks = prepare_data(train_files, dev_files, tokenizer, cfg)
    total = cfg.total_steps(len(train_feats))
    t0, t1 = int(prune_start * total), max(int(prune_start * total) + 1, int(prune_end * total))
    logits: dict[str, Any] | None = None
    stats: list[dict[str, Any]] = []
    if teachers and alpha < 1.0:
        logits, stats = ensemble_logits(
            teachers,
            training_windows(train_feats),
            tokenizer,
            Path(cache_dir or default_cache_dir()),
            n_threads,
            progress,
        )
    run = Run(
        model=model,
        tokenizer=tokenizer,
        train_feats=train_feats,
        dev_feats=dev_feats,
        dev_examples=dev_ex,
        loss=batch_loss(masks, logits, alpha if logits is not None else 1.0, temperature),
        report=lambda m: {"sparsity": sparsity_report(m)["sparsity"]},
    )
    parts: list[Any] = []
    if structured == "ffn":
        ffn = FFNCut(model, fraction, int(cut_at * total))
        run.before_step = ffn.before_step
        parts.append(ffn)
    if method == "magnitude":
        mag = Magnitude(model, sparsity, t0, t1, prune_every)
        run.after_step = mag.after_step
        parts.append(mag)
    elif method == "movement":
        mov = Movement(model, sparsity, t0, t1)
        run.before_step = _chain(run.before_step, mov.set_step)  # also after a resume
        run.after_step = mov.set_step  # evaluations see this step's sparsity
        run.param_groups = lambda _m: mov.param_groups(scores_lr)
        run.save_best = mov.save
        parts.append(mov)
    last = max(t1 if method else 0, int(cut_at * total) + 1 if structured else 0)
    run.selectable = lambda step: step >= min(last, total)
    run.state = lambda: {type(p).__name__: p.state() for p in parts if hasattr(p, "state")}
    run.restore = lambda m, st: _restore(parts, m, st)
    cfg.extra.update(
        command="prune-reader",
        model_from=source,
        method=method,
        sparsity=sparsity,
        schedule=[t0, t1, prune_every],
        scores_lr=scores_lr,
        structured=structured,
        fraction=fraction,
        cut_at=cut_at,
        teachers=[str(t) for t in teachers],
        alpha=alpha,
        temperature=temperature,
    )
    info = {
        "command": "prune-reader",
        "model_from": source,
        "teacher_logits": stats,
        "threads": n_threads,
        "train_files": [str(p) for p in train_files],
        "dev_files": [str(p) for p in dev_files],
    }
    history = train_loop(
        run,
        cfg,
        output_dir,
        name="prune-reader",
        info=info,
        stop_after=stop_after,
        fresh=fresh,
        progress=progress,
        log_every=log_every,
    )
    best = Path(output_dir) / "best"
    if (best / "model.safetensors").exists() and history["steps"] >= total:
        from transformers import AutoModelForQuestionAnswering

        saved = AutoModelForQuestionAnswering.from_pretrained(best)
        history["final"] = {
            **sparsity_report(saved),
            **compressed_size(best),
            "parameters": int(sum(p.numel() for p in saved.parameters())),
            "intermediate_size": saved.config.intermediate_size,
        }
        from qaserve.offline.train_reader import _write_json

        _write_json(Path(output_dir) / "train_log.json", history)
        shown = {k: v for k, v in history["final"].items() if k != "per_layer"}
        print(f"[prune-reader] {json.dumps(shown)}", flush=True)
    return history


def _chain(first: Any, second: Any) -> Any:
    def both(model: Any, step: int) -> bool:
        changed = bool(first(model, step)) if first else False
        second(model, step)
        return changed

    return both


def _restore(parts: list[Any], model: Any, state: dict[str, Any]) -> Any:
    for p in parts:
        if hasattr(p, "restore"):
            model = p.restore(model, state.get(type(p).__name__, {}))
    return model


def _add_args(p: argparse.ArgumentParser) -> None:
    add_loop_args(p)
    p.set_defaults(alpha=1.0)
    p.add_argument(
        "--model", default=None, help="fp32 checkpoint to prune (default: packaged MiniLM)"
    )
    p.add_argument("--method", choices=["magnitude", "movement"], default=None)
    p.add_argument("--sparsity", type=float, default=0.5, help="final share of zero weights")
    p.add_argument("--prune-start", type=float, default=0.1, help="schedule start (share of steps)")
    p.add_argument("--prune-end", type=float, default=0.7, help="target reached (share of steps)")
    p.add_argument("--prune-every", type=int, default=10, help="magnitude: steps between masks")
    p.add_argument("--scores-lr", type=float, default=1e-2, help="movement: scores' learning rate")
    p.add_argument("--structured", choices=["ffn"], default=None, help="shrink FFN matrices")
    p.add_argument("--fraction", type=float, default=0.25, help="share of FFN neurons removed")
    p.add_argument("--cut-at", type=float, default=0.1, help="structured cut (share of steps)")


def _run(args: argparse.Namespace) -> int:
    res = prune_reader(
        args.train,
        args.dev,
        args.output,
        loop_config(args),
        model_from=args.model,
        method=args.method,
        sparsity=args.sparsity,
        prune_start=args.prune_start,
        prune_end=args.prune_end,
        prune_every=args.prune_every,
        scores_lr=args.scores_lr,
        structured=args.structured,
        fraction=args.fraction,
        cut_at=args.cut_at,
        teachers=args.teacher,
        alpha=args.alpha,
        temperature=args.temperature,
        cache_dir=args.cache_dir,
        threads=args.threads,
        stop_after=args.stop_after,
        fresh=args.fresh,
    )
    best = res["best"] or {}
    final = {k: v for k, v in (res.get("final") or {}).items() if k != "per_layer"}
    print(json.dumps({"best_step": best.get("step"), **best.get("all", {}), **final}))
    return 0


COMMAND = Command(
    "prune-reader",
    "prune the reader while fine-tuning it",
    _add_args,
    _run,
    module="qaserve.offline.prune_reader",
    doc=__doc__,
    logs=True,
)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    raise SystemExit(main())
