"""`qaserve export-generator`: a fine-tuned generator as a small delta over its base model.

Writes a delta folder (qaserve.deployments.generator_delta) holding only the tensors the
checkpoint changed, int8 per row, then checks it: the full checkpoint and the delta loaded
as `generator.model` both run the same prompts (built by the generator's own prompt code,
from a train-generator run's dev examples), and the command prints the largest logit
difference and the mean KL(full || delta) of their next-token distributions over the
prompt's last position and the full model's greedy answer, and whether the two greedy
answers agree. The base model's own figures against the checkpoint show the scale of what
fine-tuning changed.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaserve.errors import ConfigError
from qaserve.offline.command import Command

# Used when the checkpoint's run folder has no examples.json (e.g. a tiny test model).
_FALLBACK = [
    {
        "question": "How long does the battery last?",
        "docs": [
            {"text": "The battery lasts about ten hours of music, which is plenty.", "score": 0.6},
            {"text": "Sound is clear and the case feels solid.", "score": 0.3},
        ],
    },
    {
        "question": "Is the room quiet?",
        "docs": [
            {"text": "Our room faced the street and was noisy until midnight.", "score": 0.5},
            {"text": "Breakfast was fresh and the staff were friendly.", "score": 0.2},
        ],
    },
]


def load_prompts(path: Path | None, limit: int) -> list[tuple[str, list[Any]]]:
    """(question, documents) pairs: the dev examples of a train-generator examples.json."""
    from qaserve_client.schema import ReadDocument

    rows: list[dict[str, Any]] = _FALLBACK
    if path is not None:
        try:
            rows = json.loads(path.read_text())["dev"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"--examples {str(path)!r}: no dev examples ({exc})", "examples"
            ) from None
    return [
        (
            row["question"],
            [
                ReadDocument(id=str(i), text=d["text"], score=d["score"])
                for i, d in enumerate(row["docs"])
            ],
        )
        for row in rows[:limit]
    ]


def _next_token_logits(gen: Any, prompt: list[int], answer: list[int]) -> Any:
    """Logits at the prompt's last position and at each answer token but the last."""
    import torch

    ids = torch.tensor([prompt + answer], dtype=torch.long, device=gen.device)
    with torch.inference_mode():
        logits = gen.model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(answer) - 1]


@dataclass
class _Agreement:
    max_diff: float = 0.0
    kls: list[float] = field(default_factory=list)
    agree: int = 0
    same: bool = True


def compare(
    reference: Any,
    candidates: dict[str, Any],
    prompts: Sequence[tuple[str, list[Any]]],
    max_new_tokens: int,
) -> dict[str, dict[str, Any]]:
    """Next-token distributions and greedy answers of each candidate against `reference`, on
    every document's prompt teacher-forced with the reference's greedy answer."""
    stats = {name: _Agreement() for name in candidates}
    for question, docs in prompts:
        ref = reference.generate(question, docs, max_new_tokens=max_new_tokens)
        answer = [t.id for t in ref.tokens]
        ref_prompts = reference.encode(question, docs)
        ref_logits = [_next_token_logits(reference, p, answer) for p in ref_prompts]
        for name, cand in candidates.items():
            st = stats[name]
            cand_answer = cand.generate(question, docs, max_new_tokens=max_new_tokens)
            st.agree += ref.text == cand_answer.text
            st.same &= ref_prompts == cand.encode(question, docs)
            for prompt, a in zip(ref_prompts, ref_logits, strict=True):
                b = _next_token_logits(cand, prompt, answer)
                st.max_diff = max(st.max_diff, float((a - b).abs().max()))
                la, lb = a.log_softmax(-1), b.log_softmax(-1)
                st.kls.extend((la.exp() * (la - lb)).sum(-1).tolist())
    return {
        name: {
            "prompts": len(prompts),
            "positions": len(st.kls),
            "max_abs_logit_diff": st.max_diff,
            "mean_kl": sum(st.kls) / max(1, len(st.kls)),
            "max_kl": max(st.kls, default=0.0),
            "greedy_agree": st.agree,
            "same_prompt_ids": st.same,
        }
        for name, st in stats.items()
    }


def export_generator(
    checkpoint: Path,
    output: Path,
    base: str | None = None,
    examples: Path | None = None,
    prompts: int = 8,
    max_new_tokens: int = 32,
    threads: int | None = None,
) -> dict[str, Any]:
    """Write the delta folder and measure its fidelity; returns the report."""
    from qaserve.config import GeneratorConfig, packaged_generator
    from qaserve.deployments.generator import RagTokenGenerator
    from qaserve.deployments.generator_delta import WEIGHTS, write_delta

    base = base or packaged_generator()
    if examples is None and (checkpoint.parent / "examples.json").is_file():
        examples = checkpoint.parent / "examples.json"
    pairs = load_prompts(examples, prompts)
    base_gen = RagTokenGenerator(GeneratorConfig(model=base), threads=threads)
    manifest = write_delta(checkpoint, output, base, base_gen.model, base_gen.tokenizer)
    full = RagTokenGenerator(GeneratorConfig(model=str(checkpoint)), threads=threads)
    delta = RagTokenGenerator(GeneratorConfig(model=str(output)), threads=threads)
    files = {p.name: p.stat().st_size for p in sorted(output.iterdir())}
    return {
        "output": str(output),
        "base": manifest["base"],
        "tokenizer": manifest["tokenizer"],
        "tensors_stored": len(manifest["tensors"]),
        "tensors_skipped": len(manifest["skipped"]),
        "parameters_stored": sum(math.prod(spec["shape"]) for spec in manifest["tensors"].values()),
        "bytes": sum(files.values()),
        "weights_bytes": files[WEIGHTS],
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")),
        "files": files,
        "examples": str(examples) if examples else "built-in",
        # base_vs_checkpoint: what not applying the delta would look like, for scale.
        **compare(full, {"fidelity": delta, "base_vs_checkpoint": base_gen}, pairs, max_new_tokens),
    }


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="a train-generator folder (best/)"
    )
    p.add_argument("--output", type=Path, required=True, help="the delta folder to write")
    p.add_argument("--base", default=None, help="GGUF file or model folder (default: packaged)")
    p.add_argument(
        "--examples",
        type=Path,
        default=None,
        help="train-generator examples.json for the check (default: next to the checkpoint)",
    )
    p.add_argument("--prompts", type=int, default=8, help="dev examples in the fidelity check")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)


def _run(args: argparse.Namespace) -> int:
    report = export_generator(
        args.checkpoint,
        args.output,
        args.base,
        args.examples,
        args.prompts,
        args.max_new_tokens,
        args.threads,
    )
    print(json.dumps(report, indent=1))
    return 0


COMMAND = Command(
    "export-generator",
    "write a fine-tuned generator as an int8 delta over its base model, and check it",
    _add_args,
    _run,
    module="qaserve.offline.export_generator",
    doc=__doc__,
)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    raise SystemExit(main())
