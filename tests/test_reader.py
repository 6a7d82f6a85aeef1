"""The ONNX reader against the transformers QA pipeline's rules, on tiny models built here.

transformers 5 removed the question-answering pipeline, so `pipeline_reference` below is its
4.x code path (fast tokenizer, align_to_words=True) transcribed loop for loop: one window at
a time through the torch model, unpadded, with transformers' own `select_starts_ends` (the
same function the QA pipeline used, now kept in the document-QA pipeline).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering
from transformers.pipelines.document_question_answering import select_starts_ends

from qaserve.config import ReaderConfig, packaged_embedder
from qaserve.deployments.onnx_export import export_reader, write_reader_folder
from qaserve.deployments.reader import Reader
from qaserve.errors import ConfigError
from qaserve_client.schema import ReadDocument, ReadRequest, ReadResponse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

MARKER = "zebra"  # one token in the MiniLM vocabulary; the planted model's answer


def _tiny_bert(tokenizer: Any, seed: int) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return BertForQuestionAnswering(config).eval()


def random_model(tokenizer: Any, seed: int = 0) -> BertForQuestionAnswering:
    """Random weights; the QA head scaled so start/end distributions are peaked, as trained."""
    model = _tiny_bert(tokenizer, seed=seed)
    with torch.no_grad():
        model.qa_outputs.weight.normal_(0.0, 1.0)
    return model


def planted_model(tokenizer: Any) -> BertForQuestionAnswering:
    """A model whose answer is the MARKER token, else [CLS] (no answer).

    Every layer's residual branches are zeroed, so the encoder passes the embeddings through;
    hidden dimension 0 is non-zero only for MARKER and dimension 1 only for [CLS], and the QA
    head reads those: MARKER scores ~17, [CLS] ~11, anything else ~0.
    """
    model = _tiny_bert(tokenizer, seed=1)
    marker = tokenizer.convert_tokens_to_ids(MARKER)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        emb = model.bert.embeddings
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            table.weight[:, :2] = 0.0
        emb.word_embeddings.weight[marker, 0] = 10.0
        emb.word_embeddings.weight[tokenizer.cls_token_id, 1] = 10.0
        model.qa_outputs.weight.zero_()
        model.qa_outputs.bias.zero_()
        model.qa_outputs.weight[:, 0] = 3.0
        model.qa_outputs.weight[:, 1] = 2.0
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(packaged_embedder())


def _save(model: BertForQuestionAnswering, tokenizer: Any, dest: Path) -> Path:
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return _save(random_model(tokenizer), tokenizer, tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def planted_ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    return _save(planted_model(tokenizer), tokenizer, tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make_reader(ckpt: Path, cache: Path, precision: str = "fp32", **cfg: Any) -> Reader:
    config = ReaderConfig(model=str(ckpt), precision=precision, optimize=False, **cfg)
    return Reader(config, cache, threads=1)


@pytest.fixture(scope="module")
def fp32(random_ckpt: Path, cache: Path) -> Reader:
    return make_reader(random_ckpt, cache, "fp32")


@pytest.fixture(scope="module")
def int8(random_ckpt: Path, cache: Path) -> Reader:
    return make_reader(random_ckpt, cache, "int8")


@pytest.fixture(scope="module")
def torch_model(random_ckpt: Path) -> BertForQuestionAnswering:
    return BertForQuestionAnswering.from_pretrained(random_ckpt).eval()


# --- the reference: transformers 4.x QuestionAnsweringPipeline, one context ---------------


def pipeline_reference(
    model: Any,
    tokenizer: Any,
    question: str,
    context: str,
    top_k: int = 1,
    max_answer_len: int = 15,
    handle_impossible_answer: bool = False,
    max_seq_len: int = 384,
    doc_stride: int = 128,
) -> list[dict[str, Any]]:
    enc = tokenizer(
        text=question,
        text_pair=context,
        padding="do_not_pad",
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_token_type_ids=True,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    num_spans = len(enc["input_ids"])
    p_mask = [[tok != 1 for tok in enc.sequence_ids(i)] for i in range(num_spans)]
    min_null_score = 1000000
    answers: list[dict[str, Any]] = []
    for i in range(num_spans):
        ids = enc["input_ids"][i]
        for cls_index in np.nonzero(np.array(ids) == tokenizer.cls_token_id)[0]:
            p_mask[i][cls_index] = 0
        feeds = {k: torch.tensor([enc[k][i]]) for k in tokenizer.model_input_names}
        with torch.no_grad():
            out = model(**feeds)
        starts, ends, scores, min_null_score = select_starts_ends(
            out.start_logits,
            out.end_logits,
            cast(Any, p_mask[i]),  # any array-like, whatever its annotation says
            feeds["attention_mask"].numpy(),
            min_null_score,
            top_k * 2 + 10,
            handle_impossible_answer,
            max_answer_len,
        )
        encoding = enc[i]
        for s, e, score in zip(starts, ends, scores, strict=True):
            try:
                a = encoding.word_to_chars(encoding.token_to_word(s), sequence_index=1)[0]
                b = encoding.word_to_chars(encoding.token_to_word(e), sequence_index=1)[1]
            except Exception:
                a, b = encoding.offsets[s][0], encoding.offsets[e][1]
            target = context[a:b]
            same = [x for x in answers if x["answer"].lower() == target.lower()]
            if same:
                same[0]["score"] += score.item()
            else:
                answers.append({"score": score.item(), "start": a, "end": b, "answer": target})
    if handle_impossible_answer:
        answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
    answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
    # The reader drops the score-0 filler the pipeline pads short contexts with.
    return [x for x in answers if x["score"] > 0 or (x["answer"] == "" and x["start"] == 0)]


def assert_same(got: ReadResponse, want: list[dict[str, Any]], rtol: float = 1e-4) -> None:
    assert [(a.answer, a.start, a.end) for a in got.answers] == [
        (w["answer"], w["start"], w["end"]) for w in want
    ]
    np.testing.assert_allclose(
        [a.score for a in got.answers], [w["score"] for w in want], rtol=rtol, atol=1e-7
    )


FILLER = (
    "I bought these headphones for my commute. The bass is deep, unbelievably so, and the "
    "noise cancelling works on trains. Battery life is about twenty hours; charging takes "
    "two. The ear cups get warm after an hour, which bothers me in summer. "
)
CASES = [
    ("How is the bass?", "The bass is deep and punchy, but the treble is harsh."),
    ("Does the battery last?", FILLER),
    ("Is the hotel close to the beach?", "Close to the beach, close to the station. Noisy."),
    (
        "What did you think of the food?",
        "Food was great! FOOD was cheap; the food, honestly, "
        "was the best part of the trip. Service: slow.",
    ),
    ("why", "Screen cracked (after 3 days), support didn't reply: 1/10, would not buy again."),
    ("How long does charging take?", FILLER * 12),  # 3 windows
]


def n_windows(tokenizer: Any, question: str, context: str) -> int:
    enc = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=384,
        stride=128,
        return_overflowing_tokens=True,
    )
    return len(enc["input_ids"])


def reference_null(model: Any, tokenizer: Any, question: str, context: str) -> float:
    """The pipeline's min_null_score: its no-answer score with handle_impossible_answer."""
    enc = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=384,
        stride=128,
        return_overflowing_tokens=True,
    )
    null = 1000000.0
    for i, ids in enumerate(enc["input_ids"]):
        p_mask = [tok != 1 for tok in enc.sequence_ids(i)]
        p_mask[0] = False  # [CLS]
        feeds = {k: torch.tensor([enc[k][i]]) for k in tokenizer.model_input_names}
        with torch.no_grad():
            out = model(**feeds)
        mask = feeds["attention_mask"].numpy()
        *_, null = select_starts_ends(
            out.start_logits, out.end_logits, cast(Any, p_mask), mask, null, 1, True, 15
        )  # p_mask: any array-like, whatever its annotation says
        assert ids[0] == tokenizer.cls_token_id
    return null


def assert_close(got: ReadResponse, want: ReadResponse) -> None:
    key = [(a.answer, a.start, a.end, a.document_id) for a in got.answers]
    assert key == [(a.answer, a.start, a.end, a.document_id) for a in want.answers]
    np.testing.assert_allclose(
        [a.score for a in got.answers], [a.score for a in want.answers], rtol=1e-5
    )
    assert got.no_answer_score == pytest.approx(want.no_answer_score, rel=1e-5)


@pytest.mark.parametrize("top_k", [1, 3, 7])
@pytest.mark.parametrize("handle_impossible_answer", [False, True])
def test_matches_the_qa_pipeline(
    fp32: Reader, torch_model: Any, tokenizer: Any, top_k: int, handle_impossible_answer: bool
) -> None:
    for question, context in CASES:
        got = fp32.read(
            question,
            [ReadDocument(text=context)],
            top_k=top_k,
            handle_impossible_answer=handle_impossible_answer,
        )
        want = pipeline_reference(
            torch_model, tokenizer, question, context, top_k, 15, handle_impossible_answer
        )
        assert_same(got, want)
        assert all(a.document_id == "0" for a in got.answers)


def test_max_answer_len_and_window_settings_follow_the_pipeline(
    random_ckpt: Path, cache: Path, torch_model: Any, tokenizer: Any
) -> None:
    small = make_reader(random_ckpt, cache, "fp32", max_seq_len=64, doc_stride=16)
    question, context = CASES[1]
    for max_answer_len in (1, 4):
        got = small.read(question, [ReadDocument(text=context)], 5, max_answer_len)
        want = pipeline_reference(
            torch_model, tokenizer, question, context, 5, max_answer_len, False, 64, 16
        )
        assert_same(got, want)


def test_no_answer_score_is_the_pipelines_null_score(fp32: Reader, torch_model, tokenizer):
    for question, context in CASES:
        got = fp32.read(question, [ReadDocument(text=context)], top_k=50)
        null = reference_null(torch_model, tokenizer, question, context)
        assert got.no_answer_score == pytest.approx(null, rel=1e-4)
        assert "" not in {a.answer for a in got.answers}  # only when asked for


@pytest.mark.parametrize("rule", ["most_confident", "best_document"])
def test_several_documents_rank_together(
    rule: str, random_ckpt: Path, cache: Path, torch_model: Any, tokenizer: Any
) -> None:
    reader = make_reader(random_ckpt, cache, "fp32", no_answer=rule)
    question = "How is it?"
    docs = [ReadDocument(id=f"d{i}", text=c) for i, (_, c) in enumerate(CASES[:4])]
    docs[2] = ReadDocument(text=docs[2].text)  # no id: its index stands in
    got = reader.read(question, docs, top_k=8, handle_impossible_answer=True)
    ids = ["d0", "d1", "2", "d3"]
    # Each document's top 8 as the pipeline ranks them; the overall top 8 is among them.
    spans = {
        (doc_id, w["answer"], w["start"]): w["score"]
        for doc_id, doc in zip(ids, docs, strict=True)
        for w in pipeline_reference(torch_model, tokenizer, question, doc.text, 8)
    }
    nulls = {
        i: reference_null(torch_model, tokenizer, question, d.text)
        for i, d in zip(ids, docs, strict=True)
    }
    if rule == "best_document":  # the null of the document holding the best span
        null_doc = max(spans, key=spans.__getitem__)[0]
    else:  # the most confident "no answer" among the documents read
        null_doc = max(nulls, key=nulls.__getitem__)
    null = nulls[null_doc]
    assert got.no_answer_score == pytest.approx(null, rel=1e-4)
    want = sorted([*spans.items(), ((null_doc, "", 0), null)], key=lambda kv: kv[1], reverse=True)[
        :8
    ]
    assert [(a.document_id, a.answer, a.start) for a in got.answers] == [k for k, _ in want]
    np.testing.assert_allclose([a.score for a in got.answers], [s for _, s in want], rtol=1e-4)


def test_spans_are_exact_substrings(fp32: Reader, int8: Reader) -> None:
    docs = [ReadDocument(id=str(i), text=c) for i, (_, c) in enumerate(CASES)]
    texts = {d.id: d.text for d in docs}
    for reader in (fp32, int8):
        for question, _ in CASES:
            got = reader.read(question, docs, top_k=20, handle_impossible_answer=True)
            assert len(got.answers) == 20
            for a in got.answers:
                assert a.answer == texts[a.document_id][a.start : a.end]
                assert a.answer == "" or a.start < a.end
            scores = [a.score for a in got.answers]
            assert scores == sorted(scores, reverse=True)


def test_int8_agrees_with_fp32_on_the_top_span(fp32: Reader, int8: Reader) -> None:
    # Every question with every context (36 inputs). Measured here with per-channel int8
    # weights: 36/36. Asserted: >= 0.75, leaving room for other CPUs' int8 kernels.
    same = total = 0
    for question, _ in CASES:
        for _, context in CASES:
            doc = [ReadDocument(text=context)]
            a, b = fp32.read(question, doc, top_k=1), int8.read(question, doc, top_k=1)
            same += (a.answers[0].start, a.answers[0].end) == (b.answers[0].start, b.answers[0].end)
            total += 1
    assert same / total >= 0.75, f"{same}/{total}"


def test_answer_in_the_last_window_of_a_long_context(planted_ckpt: Path, cache: Path, tokenizer):
    head = "The room was clean and the staff were friendly. " * 150
    context = head + f"Breakfast had {MARKER} steak, oddly. Check-out was quick."
    start = context.index(MARKER)
    question = "What was odd about breakfast?"
    enc = tokenizer(
        question,
        context,
        truncation="only_second",
        max_length=384,
        stride=128,
        return_overflowing_tokens=True,
    )
    marker_id = tokenizer.convert_tokens_to_ids(MARKER)
    windows = list(enc["input_ids"])
    assert len(tokenizer(context)["input_ids"]) > 1400 and len(windows) >= 5
    assert [marker_id in ids for ids in windows] == [False] * (len(windows) - 1) + [True]

    model = BertForQuestionAnswering.from_pretrained(planted_ckpt).eval()
    for precision in ("fp32", "int8"):
        reader = make_reader(planted_ckpt, cache, precision)
        got = reader.read(question, [ReadDocument(id="r", text=context)], top_k=3)
        best = got.answers[0]
        assert (best.answer, best.start, best.end) == (MARKER, start, start + len(MARKER))
        assert best.score > 0.95
        if precision == "fp32":
            assert_same(got, pipeline_reference(model, tokenizer, question, context, 3))


def test_word_alignment_and_impossible_answers(planted_ckpt: Path, cache: Path) -> None:
    reader = make_reader(planted_ckpt, cache, "int8")
    # The model points at the piece `zebra` of `zebras`: the answer is widened to the word.
    text = "Two zebras, Nine lions."
    got = reader.read("what?", [ReadDocument(text=text)], handle_impossible_answer=True)
    assert (got.answers[0].answer, got.answers[0].start) == ("zebras", 4)
    assert got.no_answer_score is not None
    assert got.answers[0].score > got.no_answer_score
    # Without the marker, [CLS] wins: the empty answer comes first, when asked for.
    docs = [ReadDocument(id="a", text="Nine lions and a giraffe."), ReadDocument(text="Cats.")]
    got = reader.read("what?", docs, top_k=2, handle_impossible_answer=True)
    assert got.answers[0].answer == "" and (got.answers[0].start, got.answers[0].end) == (0, 0)
    assert got.no_answer_score is not None
    assert got.answers[0].score == got.no_answer_score > 0.9
    assert got.answers[1].answer != ""
    got = reader.read("what?", docs, top_k=2)
    assert "" not in [a.answer for a in got.answers]
    assert got.no_answer_score is not None
    assert got.no_answer_score > 0.9


def test_one_session_run_per_call(fp32: Reader, tokenizer: Any) -> None:
    calls: list[int] = []
    session = fp32.session
    run = session.run

    class Counting:
        def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
            calls.append(feeds["input_ids"].shape[0])
            return run(names, feeds)

    fp32.session = Counting()
    try:
        docs = [ReadDocument(text=c) for _, c in CASES]
        single = fp32.read("How long?", docs, top_k=5)
        windows = [n_windows(tokenizer, "How long?", d.text) for d in docs]
        assert windows == [1, 1, 1, 1, 1, 3]
        assert calls == [8]
        requests = [
            ReadRequest(question="How long?", documents=docs, top_k=5),
            {"question": "why", "documents": [{"text": CASES[4][1]}], "top_k": 2},
            ReadRequest(
                question="food?", documents=docs[3:4], top_k=4, handle_impossible_answer=True
            ),
        ]
        calls.clear()
        batched = fp32.read_batch(requests)
        assert calls == [8 + 1 + 1]
    finally:
        fp32.session = session
    assert_close(batched[0], single)
    assert_close(batched[1], fp32.read("why", [ReadDocument(text=CASES[4][1])], top_k=2))
    assert_close(batched[2], fp32.read("food?", docs[3:4], top_k=4, handle_impossible_answer=True))


def test_window_cap_splits_runs_without_changing_answers(random_ckpt: Path, cache: Path):
    capped = Reader(
        ReaderConfig(model=str(random_ckpt), precision="fp32", optimize=False),
        cache,
        threads=1,
        max_batch_windows=2,
    )
    whole = make_reader(random_ckpt, cache, "fp32")
    docs = [ReadDocument(text=c) for _, c in CASES]
    assert_close(capped.read("How long?", docs, top_k=6), whole.read("How long?", docs, top_k=6))


def test_a_long_question_is_cut_not_fatal(fp32: Reader) -> None:
    question = "is it good " * 300  # ~900 tokens, over the whole window
    got = fp32.read(question, [ReadDocument(text=CASES[0][1])], top_k=2)
    assert len(got.answers) == 2


def test_exported_folder_serves_without_torch(random_ckpt: Path, cache: Path, tmp_path: Path):
    folder = write_reader_folder(str(random_ckpt), tmp_path / "reader", "int8", cache_dir=cache)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from qaserve.config import ReaderConfig\n"
        "from qaserve.deployments.reader import Reader\n"
        f"r = Reader(ReaderConfig(model={str(folder)!r}), Path({str(tmp_path)!r}), threads=1)\n"
        "out = r.read('How is the bass?', [{'text': 'The bass is deep.'}])\n"
        "assert out.answers and r.info().format == 'onnx-int8', (out, r.info())\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_info_describes_the_model(int8: Reader, random_ckpt: Path, cache: Path) -> None:
    info = int8.info()
    size = (export_reader(str(random_ckpt), cache, "int8") / "model.onnx").stat().st_size
    assert (info.stage, info.model, info.format, info.device) == (
        "reader",
        str(random_ckpt),
        "onnx-int8",
        "cpu",
    )
    assert info.size_mb == pytest.approx(size / 2**20, abs=0.01)
    assert make_reader(random_ckpt, cache, "fp32").info().format == "onnx-fp32"


def test_no_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no reader model configured"):
        Reader(ReaderConfig(model=None), tmp_path)
    with pytest.raises(ConfigError, match=r"reader\.model"):
        Reader(ReaderConfig(model=str(tmp_path / "missing")), tmp_path)


def test_windows_that_leave_no_room_are_a_config_error(random_ckpt: Path, cache: Path) -> None:
    with pytest.raises(ConfigError, match="doc_stride"):
        make_reader(random_ckpt, cache, "fp32", max_seq_len=64, doc_stride=64)


def test_shipped_readers_are_picked_by_name() -> None:
    """`reader.model: <name>` selects a reader committed under serve/assets by its name."""
    from qaserve.config import REPO_ASSETS, SHIPPED_READERS

    for name, folder in SHIPPED_READERS.items():
        assert ReaderConfig(model=name).model == str(REPO_ASSETS / folder)
        assert (REPO_ASSETS / folder / "model.onnx").is_file()
        assert (REPO_ASSETS / folder / "README.md").is_file()  # its model card
    assert ReaderConfig().model == ReaderConfig(model="minilm-l6-subjqa").model
    assert ReaderConfig(model="org/some-qa-model").model == "org/some-qa-model"  # hub ids pass
