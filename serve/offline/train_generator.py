"""`qaserve train-generator`: fine-tune the RAG-Token generator on SubjQA (Lewis et al. 2020).

Objective: for a question x with documents z_1..z_k and prior p(z|x), minimise
-sum_t log sum_z p(z|x) p(y_t | x, z, y_<t) (qaserve.deployments.rag_objective), computed on
the generator's own prompts (RagTokenGenerator.encode) and prior (log_prior), so the model
is trained exactly as it is served.

Examples (one per question):
- target: the question's first non-empty gold span (one row group per question keeps an
  epoch at ~5,000 groups; extra golds would multiply the cost for near-duplicate spans);
  an unanswerable question's target is NO_ANSWER_TEXT, which the ensemble reads as no answer.
- documents: the question's own review plus the k-1 reviews of the same item that the
  packaged dense encoder ranks highest for the question (the hard negatives retrieval would
  give; other reviews of the domain when the item has too few), each cut to a window of
  --window generator tokens (the own review's window holds the answer). The prior is the
  softmax of the encoder's cosine scores, the same scores the served prior gets. Cheaper
  than indexing and retrieving passages, and the own review is always among the documents,
  so every answerable target is reachable. Negatives come from the train and dev reviews
  (texts only, no labels).
On CPU the cost is rows x tokens: k=2 documents and ~200-token windows while training
(serving may use more), length-bucketed batches, optionally frozen lower layers (peft is
not installed here, so no LoRA). Best-by-dev checkpoint in OUTPUT/best (a folder
GeneratorConfig(model=...) loads), resumable state in OUTPUT/checkpoint, OUTPUT/train_log.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qaserve.deployments.prior import NO_ANSWER_TEXT, is_no_answer
from qaserve.errors import ConfigError
from qaserve.offline.command import Command
from qaserve.offline.optim import adamw_with_warmup
from qaserve.offline.train_reader import length_batches
from qaserve.subjqa import QAExample, load_subjqa
from qaserve.threads import bound_threads

log = logging.getLogger(__name__)

DOCS = 2
WINDOW = 192
_STATE = "state.json"


@dataclass
class Doc:
    text: str
    score: float


@dataclass
class GenExample:
    """One question with its documents (own review first) and its training target."""

    id: str
    question: str
    docs: list[Doc]
    target: str
    golds: list[str]
    domain: str


def target_text(ex: QAExample) -> str:
    """The first non-empty gold span, or NO_ANSWER_TEXT for an unanswerable question."""
    return next((a.text for a in ex.answers if a.text), NO_ANSWER_TEXT)


def window(text: str, tokenizer: Any, size: int, rng: random.Random, span: tuple[int, int]) -> str:
    """At most `size` tokens of `text` holding the characters `span` (when start >= 0) at a
    random position (a span longer than `size` is returned whole); cut on token offsets, so
    the window is a substring of the review."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= size:
        return text
    first, last = 0, len(offsets) - size  # window start token range
    start, end = span
    if start >= 0:
        a = next((i for i, (s, e) in enumerate(offsets) if e > start), 0)
        b = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end), a)
        if b - a + 1 > size:  # a longer answer is the window: the target stays copyable
            return text[offsets[a][0] : offsets[b][1]]
        first, last = max(0, b - size + 1), min(a, last)
    lo = rng.randint(first, max(first, last))
    hi = min(lo + size, len(offsets)) - 1
    return text[offsets[lo][0] : offsets[hi][1]]


def build_examples(
    questions: Sequence[QAExample],
    pool: Sequence[QAExample],
    tokenizer: Any,
    embed: Any,
    *,
    docs: int = DOCS,
    window_tokens: int = WINDOW,
    seed: int = 0,
) -> list[GenExample]:
    """Each question with its own review's window and the k-1 best-scored other reviews.

    `embed(texts) -> unit rows` is the packaged encoder (retriever.Embedder.embed);
    `pool` gives the reviews (deduplicated by review id) the negatives come from. Only the
    reviews of the questions' items are embedded (a domain's, for an item with too few).
    Windows are seeded per review and question, so a subset gets the same documents.
    """
    reviews: dict[str, QAExample] = {}
    for ex in [*pool, *questions]:
        reviews.setdefault(ex.review_id, ex)
    by_item: dict[str, list[str]] = {}
    by_domain: dict[str, list[str]] = {}
    for rid, ex in reviews.items():
        by_item.setdefault(ex.item_id, []).append(rid)
        by_domain.setdefault(ex.domain, []).append(rid)
    neg_text: dict[str, str] = {}
    neg_vec: dict[str, np.ndarray] = {}

    def negatives(rids: Sequence[str]) -> None:
        """Window and embed the reviews not done yet, in one encoder call."""
        todo = [r for r in dict.fromkeys(rids) if r not in neg_vec]
        for rid in todo:
            rng = random.Random(f"{seed}:{rid}")
            neg_text[rid] = window(reviews[rid].context, tokenizer, window_tokens, rng, (-1, -1))
        for rid, vec in zip(todo, embed([neg_text[r] for r in todo]), strict=True):
            neg_vec[rid] = vec

    own_text = []
    for ex in questions:
        gold = next((a for a in ex.answers if a.text), None)
        span = (gold.start, gold.end) if gold else (-1, -1)
        rng = random.Random(f"{seed}:{ex.id}")
        own_text.append(window(ex.context, tokenizer, window_tokens, rng, span))
    vec_q = embed([ex.question for ex in questions])
    vec_own = embed(own_text)
    if docs > 1:
        negatives([r for ex in questions for r in by_item[ex.item_id]])
        short = {ex.domain for ex in questions if len(by_item[ex.item_id]) < docs}
        negatives([r for d in sorted(short) for r in by_domain[d]])
    out = []
    for q, ex in enumerate(questions):
        chosen: list[Doc] = [Doc(own_text[q], float(vec_q[q] @ vec_own[q]))]
        for group in (by_item[ex.item_id], by_domain[ex.domain]):
            if len(chosen) >= docs:
                break
            taken = {d.text for d in chosen}
            cands = [r for r in group if r != ex.review_id]
            scores = np.array([float(neg_vec[r] @ vec_q[q]) for r in cands])
            for j in np.argsort(-scores, kind="stable"):
                text = neg_text[cands[j]]
                if text not in taken and len(chosen) < docs:
                    chosen.append(Doc(text, float(scores[j])))
                    taken.add(text)
        out.append(
            GenExample(ex.id, ex.question, chosen, target_text(ex), ex.gold_texts, ex.domain)
        )
    return out


@dataclass
class Encoded:
    prompts: list[list[int]]  # one per document
    target: list[int]

    @property
    def length(self) -> int:
        return max(len(p) for p in self.prompts) + len(self.target)


def encode_example(gen: Any, ex: GenExample) -> Encoded:
    """Prompts as the generator builds them (its truncation included) and the answer ids."""
    from qaserve.deployments.rag_objective import answer_ids

    return Encoded(gen.encode(ex.question, _read_docs(ex)), answer_ids(gen, ex.target))


def _read_docs(ex: GenExample) -> list[Any]:
    from qaserve_client.schema import ReadDocument

    return [ReadDocument(id=str(i), text=d.text, score=d.score) for i, d in enumerate(ex.docs)]


def batch_loss(gen: Any, examples: Sequence[GenExample], encoded: Sequence[Encoded]) -> Any:
    """Mean over the batch of -log p(y|x), the RAG-Token sequence negative log-likelihood."""
    import torch

    from qaserve.deployments.rag_objective import rag_token_logprobs

    k = len(examples[0].docs)
    if any(len(e.docs) != k for e in examples):
        raise ValueError("every example of a batch needs the same number of documents")
    prior = torch.stack([gen.log_prior(_read_docs(e)) for e in examples])
    scores = rag_token_logprobs(
        gen.model,
        [p for enc in encoded for p in enc.prompts],
        [enc.target for enc in encoded],
        prior,
        gen.pad_id,
    )
    return -scores.sequence_logprob.mean(), int(scores.lengths.sum())


def dev_metrics(
    gen: Any,
    examples: Sequence[GenExample],
    encoded: Sequence[Encoded],
    generate: int,
    batch_size: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Dev loss (per question and per token) on all of `examples`; greedy generation scored by
    SQuAD 2.0 official EM/F1 on the first `generate` of them."""
    import torch

    from qaserve.metrics import squad_em_f1

    was = gen.model.training
    gen.model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: encoded[i].length)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            loss, n = batch_loss(gen, [examples[i] for i in idx], [encoded[i] for i in idx])
            total += float(loss) * len(idx)
            tokens += n
    res: dict[str, Any] = {
        "loss": total / max(1, len(examples)),
        "token_loss": total / max(1, tokens),
        "n": len(examples),
    }
    scored = []
    for ex in examples[:generate]:
        text = gen.generate(ex.question, _read_docs(ex), max_new_tokens=max_new_tokens).text
        pred = "" if is_no_answer(text) else text.strip()
        em, f1 = squad_em_f1(pred, ex.golds)
        scored.append((em, f1, pred == ""))
    if scored:
        res.update(
            em=float(np.mean([s[0] for s in scored])),
            f1=float(np.mean([s[1] for s in scored])),
            no_answer_rate=float(np.mean([s[2] for s in scored])),
            generated=len(scored),
        )
    gen.model.train(was)
    return res


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _save_model(gen: Any, dest: Path, dtype: Any = None) -> None:
    """A folder RagTokenGenerator loads: weights (safetensors), tokenizer, generation config."""
    import torch

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = gen.model
    if dtype is not None and dtype != torch.float32:
        # A copy, so training keeps its fp32 weights; deepcopy keeps tied weights tied (a
        # converted state_dict would store SmolLM2's tied output layer twice: +57 MB).
        model = copy.deepcopy(model).to(dtype)
    model.save_pretrained(tmp)
    gen.tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)


def unmark_gguf(model: Any) -> None:
    """A GGUF file loads dequantised to plain fp32 tensors, yet transformers keeps it marked as
    GGUF-quantised and refuses to save_pretrained it: drop the mark (the weights are plain)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def freeze_lower(model: Any, layers: int) -> int:
    """Freeze the token embeddings (a tied output layer with them) and the first `layers`
    blocks: backward then stops above them. Returns the count of trainable parameters."""
    if layers > 0:
        model.get_input_embeddings().requires_grad_(False)
        blocks = getattr(model.get_decoder(), "layers", None)
        if blocks is None:
            raise ConfigError("--freeze-layers: the model has no `layers` list", "freeze_layers")
        for block in list(blocks)[:layers]:
            block.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_generator(
    data: Sequence[Path],
    output_dir: Path,
    base_model: str | None = None,
    *,
    docs: int = DOCS,
    window_tokens: int = WINDOW,
    max_doc_tokens: int = 256,
    limit: int | None = None,
    dev_limit: int | None = 200,
    dev_generate: int = 48,
    max_new_tokens: int = 32,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 4,
    lr: float = 5e-5,
    warmup: float = 0.05,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    freeze_layers: int = 0,
    seed: int = 42,
    eval_every: int | None = None,
    save_every: int = 50,
    select: str = "loss",
    save_dtype: str = "bfloat16",
    threads: int | None = None,
    log_every: int = 10,
    progress: bool = True,
    stop_after: int | None = None,
    embed: Any = None,
) -> dict[str, Any]:
    """Train; returns the log also written to OUTPUT/train_log.json.

    Resumes from OUTPUT/checkpoint when it exists (same settings required). `stop_after`
    stops after that many steps in this call (the schedule stays the full run's), as an
    interruption would; `embed` replaces the packaged encoder (tests pass the real one in).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n_threads = bound_threads(threads)
    import torch
    from tqdm import tqdm

    from qaserve.config import GeneratorConfig, packaged_generator
    from qaserve.deployments.generator import RagTokenGenerator

    if select not in ("loss", "f1"):
        raise ConfigError("--select must be 'loss' or 'f1'", "select")
    if docs < 1 or window_tokens < 8 or batch_size < 1:
        raise ConfigError("--docs, --window and --batch-size must be positive", "docs")
    t0 = time.time()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt = output_dir / "checkpoint"
    base_model = base_model or packaged_generator()
    hparams = {
        "base_model": base_model,
        "data": [str(p) for p in data],
        "docs": docs,
        "window": window_tokens,
        "max_doc_tokens": max_doc_tokens,
        "limit": limit,
        "dev_limit": dev_limit,
        "dev_generate": dev_generate,
        "epochs": epochs,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "freeze_layers": freeze_layers,
        "seed": seed,
        "select": select,
        "target": f"first non-empty gold span; unanswerable -> {NO_ANSWER_TEXT!r}",
        "documents": "own review window + top (k-1) same-item reviews by packaged-encoder cosine",
    }
    resume = (ckpt / _STATE).is_file()
    state: dict[str, Any] = json.loads((ckpt / _STATE).read_text()) if resume else {}
    if resume:
        saved = {k: v for k, v in state["history"]["hparams"].items() if k != "threads"}
        if saved != hparams:
            changed = sorted(k for k in hparams if saved.get(k) != hparams[k])
            raise ConfigError(
                f"{ckpt} is a run with other settings ({', '.join(changed)}): "
                "use another --output or delete it",
                "output",
            )
    cfg = GeneratorConfig(
        model=str(ckpt) if resume else base_model, max_doc_tokens=max_doc_tokens, kind="causal"
    )
    gen = RagTokenGenerator(cfg, threads=n_threads)
    unmark_gguf(gen.model)
    torch.manual_seed(seed)

    train_q = load_subjqa(data, "train")
    dev_q = load_subjqa(data, "dev")
    pool = [*train_q, *dev_q]
    rng = random.Random(seed)
    if limit:
        train_q = rng.sample(train_q, min(limit, len(train_q)))
    if dev_limit:
        dev_q = random.Random(seed + 1).sample(dev_q, min(dev_limit, len(dev_q)))
    cache = output_dir / "examples.json"
    saved_ex = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved_ex.get("hparams") == hparams:  # this run's documents: a resume does not re-embed
        train_ex = [_example(e) for e in saved_ex["train"]]
        dev_ex = [_example(e) for e in saved_ex["dev"]]
    else:
        if embed is None:  # the packaged encoder, loaded only when the cache cannot serve
            from qaserve.config import EmbedderConfig
            from qaserve.deployments.retriever import Embedder

            embed = Embedder(EmbedderConfig(), threads=n_threads).embed
        kw = {"docs": docs, "window_tokens": window_tokens}
        train_ex = build_examples(train_q, pool, gen.tokenizer, embed, seed=seed, **kw)
        dev_ex = build_examples(dev_q, pool, gen.tokenizer, embed, seed=seed + 1, **kw)
        _write_json(
            cache,
            {
                "hparams": hparams,
                "train": [asdict(e) for e in train_ex],
                "dev": [asdict(e) for e in dev_ex],
            },
        )
    # A batch needs one document count: drop the rare question whose domain had too few.
    dropped = sum(len(e.docs) != docs for e in [*train_ex, *dev_ex])
    train_ex = [e for e in train_ex if len(e.docs) == docs]
    dev_ex = [e for e in dev_ex if len(e.docs) == docs]
    train_enc = [encode_example(gen, e) for e in train_ex]
    dev_enc = [encode_example(gen, e) for e in dev_ex]
    lengths = [enc.length for enc in train_enc]
    steps_per_epoch = math.ceil(len(train_ex) / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    trainable = freeze_lower(gen.model, freeze_layers)
    params = [p for p in gen.model.parameters() if p.requires_grad]
    opt, sched = adamw_with_warmup(gen.model, lr, total, warmup, weight_decay)
    if resume:
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        sched.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        history = state["history"]
        step, epoch, position = state["step"], state["epoch"], state["position"]
    else:
        history = {
            "hparams": {**hparams, "threads": n_threads},
            "data": {
                "train_examples": len(train_ex),
                "dropped_few_documents": dropped,
                "train_no_answer": sum(e.target == NO_ANSWER_TEXT for e in train_ex),
                "mean_train_tokens": float(np.mean(lengths)) if lengths else 0.0,
                "mean_target_tokens": float(np.mean([len(e.target) for e in train_enc]))
                if train_enc
                else 0.0,
                "dev_examples": len(dev_ex),
                "trainable_params": trainable,
                "total_steps": total,
            },
            "losses": [],
            "evals": [],
            "best": None,
            "train_s": 0.0,
        }
        step, epoch, position = 0, 0, 0
    print(f"[train-generator] {json.dumps(history['data'])}", flush=True)
    save_type = getattr(torch, save_dtype)
    session_t0 = time.time()
    train_s0 = float(history["train_s"])

    def save_checkpoint() -> None:
        history["train_s"] = round(train_s0 + time.time() - session_t0, 1)
        tmp = output_dir / "checkpoint.tmp"
        _save_model(gen, tmp)
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        torch.save(sched.state_dict(), tmp / "scheduler.pt")
        torch.save(torch.get_rng_state(), tmp / "rng.pt")
        (tmp / _STATE).write_text(
            json.dumps({"step": step, "epoch": epoch, "position": position, "history": history})
        )
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.replace(ckpt)
        _write_json(output_dir / "train_log.json", history)

    def run_eval() -> None:
        if not dev_ex:
            return
        te = time.time()
        res = dev_metrics(gen, dev_ex, dev_enc, dev_generate, batch_size * 2, max_new_tokens)
        res.update(step=step, eval_s=round(time.time() - te, 1), wall_s=round(time.time() - t0, 1))
        history["evals"].append(res)
        best = history["best"]
        better = best is None or (
            res["loss"] < best["loss"] if select == "loss" else res.get("f1", 0) > best.get("f1", 0)
        )
        if better:
            history["best"] = res
            _save_model(gen, output_dir / "best", save_type)
        print(
            f"[train-generator] dev step {step}: loss {res['loss']:.4f} F1 {res.get('f1', 0):.4f} "
            f"no-answer {res.get('no_answer_rate', 0):.2f} ({res['eval_s']}s)"
            + (" best" if better else ""),
            flush=True,
        )

    gen.model.train()
    bar = tqdm(
        total=total,
        initial=step,
        disable=not progress,
        mininterval=1 if sys.stderr.isatty() else 30,
        desc="train-generator",
    )
    end = total if stop_after is None else min(total, step + stop_after)
    running, tokens, since = 0.0, 0, 0

    def _train_loop() -> None:
        nonlocal step, epoch, position, running, tokens, since
        while step < end:
            batches = length_batches(lengths, batch_size, random.Random(seed * 1000 + epoch))
            while position < len(batches) and step < end:
                idx = batches[position]
                loss, n = batch_loss(gen, [train_ex[i] for i in idx], [train_enc[i] for i in idx])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step, position = step + 1, position + 1
                running, tokens, since = running + loss.item(), tokens + n, since + 1
                bar.update(1)
                if step % log_every == 0 or step == total:
                    history["losses"].append(
                        {
                            "step": step,
                            "loss": running / since,
                            "lr": sched.get_last_lr()[0],
                            "wall_s": round(time.time() - t0, 1),
                        }
                    )
                    bar.set_postfix(loss=f"{running / since:.3f}")
                    running, tokens, since = 0.0, 0, 0
                evaluated = bool(eval_every) and step % eval_every == 0 and step < total
                if evaluated:
                    run_eval()
                if evaluated or (save_every and step % save_every == 0):
                    save_checkpoint()
            if position >= len(batches):
                epoch, position = epoch + 1, 0

    try:
        _train_loop()
    except KeyboardInterrupt:  # keep what was done: the next call resumes from here
        bar.close()
        save_checkpoint()
        raise
    bar.close()
    if step >= total and (not history["evals"] or history["evals"][-1]["step"] != step):
        run_eval()
    if not dev_ex and step >= total:
        _save_model(gen, output_dir / "best", save_type)
    history["steps"] = step
    save_checkpoint()
    history["wall_s"] = round(time.time() - t0, 1)
    _write_json(output_dir / "train_log.json", history)
    return history


def _example(obj: dict[str, Any]) -> GenExample:
    return GenExample(**{**obj, "docs": [Doc(**d) for d in obj["docs"]]})


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        nargs="+",
        type=Path,
        required=True,
        help="SubjQA data root or domain folders (their train and dev splits are used)",
    )
    p.add_argument("--output", type=Path, required=True, help="run folder (best/, checkpoint/)")
    p.add_argument("--base-model", default=None, help="default: the packaged SmolLM2 GGUF")
    p.add_argument("--docs", type=int, default=DOCS, help="documents per question (k)")
    p.add_argument("--window", type=int, default=WINDOW, help="tokens of review per document")
    p.add_argument("--max-doc-tokens", type=int, default=256, help="as GeneratorConfig")
    p.add_argument("--limit", type=int, default=None, help="train questions (random subset)")
    p.add_argument("--dev-limit", type=int, default=200, help="dev questions for the dev loss")
    p.add_argument("--dev-generate", type=int, default=48, help="of them, generated and scored")
    p.add_argument("--max-new-tokens", type=int, default=32, help="when generating on dev")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--freeze-layers", type=int, default=0, help="also freezes the embeddings")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-every", type=int, default=None, help="steps (default: at the end)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--select", choices=["loss", "f1"], default="loss", help="best-by-dev key")
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps (resumable)")
    p.add_argument("--threads", type=int, default=None)


def _run(args: argparse.Namespace) -> int:
    res = train_generator(
        args.data,
        args.output,
        args.base_model,
        docs=args.docs,
        window_tokens=args.window,
        max_doc_tokens=args.max_doc_tokens,
        limit=args.limit,
        dev_limit=args.dev_limit,
        dev_generate=args.dev_generate,
        max_new_tokens=args.max_new_tokens,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        freeze_layers=args.freeze_layers,
        seed=args.seed,
        eval_every=args.eval_every,
        save_every=args.save_every,
        select=args.select,
        save_dtype=args.save_dtype,
        threads=args.threads,
        stop_after=args.stop_after,
    )
    print(json.dumps({"best": res["best"], "steps": res["steps"], "train_s": res["train_s"]}))
    return 0


COMMAND = Command(
    "train-generator",
    "fine-tune the RAG-Token generator on SubjQA (marginal likelihood)",
    _add_args,
    _run,
    module="qaserve.offline.train_generator",
    doc=__doc__,
    logs=True,
)
register = COMMAND.register
main = COMMAND.main


if __name__ == "__main__":
    raise SystemExit(main())
