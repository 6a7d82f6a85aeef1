"""The generator delta format (qaserve.deployments.generator_delta) and `qaserve export-generator`,
on a tiny random Llama standing in for SmolLM2 and a "fine-tuned" copy saved by train-generator's
own save path (bf16, so untouched tensors are the base rounded, as in a real run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qaserve.config import GeneratorConfig
from qaserve.deployments.generator import RagTokenGenerator
from qaserve.deployments.generator_delta import (
    MANIFEST,
    WEIGHTS,
    dequantise_rows,
    quantise_rows,
    write_delta,
)
from qaserve.errors import ConfigError
from qaserve.offline.train_generator import _save_model
from qaserve_client.schema import ReadDocument

CHANGED = {
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
}
TRAINING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant (trained)\n{% endif %}"
)
DOCS = [
    ReadDocument(id="a", text="The battery lasts ten hours and the sound is clear.", score=0.7),
    ReadDocument(id="b", text="The case is small and feels solid.", score=0.2),
]


def _load(model: Path | str) -> RagTokenGenerator:
    return RagTokenGenerator(GeneratorConfig(model=str(model), max_new_tokens=6), threads=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base/, a fine-tuned checkpoint/ (three tensors and the chat template changed) and the
    delta/ of one over the other."""
    from tiny_models import tiny_causal_lm_dir

    root = tmp_path_factory.mktemp("delta")
    base = tiny_causal_lm_dir(root / "base")
    tuned = _load(base)
    params = dict(tuned.model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(CHANGED):  # a set's order follows PYTHONHASHSEED: the noise would too
            p = params[name]
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=gen))
    tuned.tokenizer.chat_template = TRAINING_TEMPLATE
    _save_model(tuned, root / "checkpoint", torch.bfloat16)
    _save_model(tuned, root / "checkpoint32", torch.float32)
    base_gen = _load(base)
    for name in ("", "32"):
        write_delta(
            root / f"checkpoint{name}",
            root / f"delta{name}",
            str(base),
            base_gen.model,
            base_gen.tokenizer,
        )
    return {"root": root, "base": base, **{p.name: p for p in root.iterdir()}}


def _logits(gen: RagTokenGenerator, prompt_from: RagTokenGenerator) -> torch.Tensor:
    """`gen`'s logits on the prompt `prompt_from` builds (the same ids for every model)."""
    ids = torch.tensor(prompt_from.encode("How long does the battery last?", DOCS)[:1])
    with torch.inference_mode():
        return gen.model(input_ids=ids).logits.float()


def test_quantise_rows_error_is_within_half_a_step() -> None:
    w = torch.randn(7, 33) * torch.logspace(-3, 1, 7)[:, None]  # rows of very different scale
    q, scale = quantise_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (7,)
    err = (dequantise_rows(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


def test_only_the_changed_tensors_are_stored(models: dict[str, Path]) -> None:
    for fp32 in ("delta32", "delta"):  # bf16: the rounded untouched ones are skipped too
        assert set(json.loads((models[fp32] / MANIFEST).read_text())["tensors"]) == CHANGED
    manifest = json.loads((models["delta"] / MANIFEST).read_text())
    assert manifest["base"]["file"] == "model.safetensors"
    assert manifest["tokenizer"] == "base (chat template stored)"
    with safe_open(str(models["delta"] / WEIGHTS), framework="pt") as f:
        stored = {name: f.get_tensor(name).dtype for name in f.keys()}  # noqa: SIM118
    assert stored["model.layers.1.self_attn.q_proj.weight"] == torch.int8
    assert stored["model.norm.weight"] == torch.float32
    assert set(stored) == CHANGED | {f"{n}.int8_scale" for n in CHANGED if stored[n] == torch.int8}


def test_delta_reproduces_the_finetuned_logits(models: dict[str, Path]) -> None:
    # An fp32 checkpoint: a bf16 one differs from the fp32 it was trained as in every tensor,
    # frozen ones included (its rounding costs more than int8 does), where the delta does not.
    checkpoint = _load(models["checkpoint32"])
    tuned = _logits(checkpoint, checkpoint)
    delta = _logits(_load(models["delta32"]), checkpoint)
    base = _logits(_load(models["base"]), checkpoint)
    fine_tuning = (tuned - base).abs().max()
    assert fine_tuning > 0.5  # the delta has something to reproduce
    # int8 per row: a small fraction of it (measured 1.8 %).
    assert (delta - tuned).abs().max() < 0.05 * fine_tuning


def test_delta_carries_the_training_chat_template(models: dict[str, Path]) -> None:
    delta = _load(models["delta"])
    assert delta.tokenizer.chat_template == TRAINING_TEMPLATE
    assert _load(models["base"]).tokenizer.chat_template != TRAINING_TEMPLATE
    assert "assistant (trained)" in delta.tokenizer.decode(delta.encode("Why?", DOCS)[0])
    assert delta.info().format.endswith("int8 delta of 3 tensors")


def test_a_different_base_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    base = shutil.copytree(models["base"], tmp_path / "base")
    base_gen = _load(base)
    write_delta(
        models["checkpoint"], tmp_path / "delta", str(base), base_gen.model, base_gen.tokenizer
    )
    _load(tmp_path / "delta")  # loads over its own base
    config = LlamaConfig.from_pretrained(base)
    other = LlamaForCausalLM(config)  # same shapes, other weights
    other.save_pretrained(base)
    with pytest.raises(ConfigError, match=r"made for base model\.safetensors"):
        _load(tmp_path / "delta")
    shutil.rmtree(base)
    with pytest.raises(ConfigError, match="is missing"):
        _load(tmp_path / "delta")


def test_a_checkpoint_of_another_architecture_is_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    base_gen = _load(models["base"])
    config = LlamaConfig.from_pretrained(models["base"])
    config.intermediate_size = 48
    other = tmp_path / "other"
    LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(ConfigError, match="another architecture"):
        write_delta(
            other,
            tmp_path / "delta",
            str(models["base"]),
            _load(models["base"]).model,
            base_gen.tokenizer,
        )


def test_export_generator_command(
    models: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from qaserve.cli import main

    out = models["root"] / "exported"
    argv = ["export-generator", "--checkpoint", str(models["checkpoint32"]), "--output", str(out)]
    assert (
        main([*argv, "--base", str(models["base"]), "--prompts", "2", "--max-new-tokens", "4"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["tensors_stored"] == 3 and report["tensors_skipped"] > 3
    assert report["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    fid, ref = report["fidelity"], report["base_vs_checkpoint"]
    assert fid["prompts"] == 2 and fid["same_prompt_ids"]
    assert fid["greedy_agree"] == 2
    assert fid["mean_kl"] < 0.01 * ref["mean_kl"]
    assert fid["max_abs_logit_diff"] < 0.05 * ref["max_abs_logit_diff"]
    # The folder it wrote is a generator model.
    assert _load(out).generate("How long does the battery last?", DOCS).text is not None


def test_a_changed_tokenizer_is_stored(models: dict[str, Path], tmp_path: Path) -> None:
    tuned = _load(models["checkpoint32"])
    tuned.tokenizer.model_max_length = 77  # a tokenizer setting training changed
    _save_model(tuned, tmp_path / "checkpoint")
    base_gen = _load(models["base"])
    manifest = write_delta(
        tmp_path / "checkpoint",
        tmp_path / "delta",
        str(models["base"]),
        base_gen.model,
        base_gen.tokenizer,
    )
    assert manifest["tokenizer"] == "stored"
    assert (tmp_path / "delta" / "tokenizer.json").is_file()
    delta = _load(tmp_path / "delta")
    assert delta.tokenizer.model_max_length == 77
    assert delta.tokenizer.chat_template == TRAINING_TEMPLATE


def test_how_a_tokenizer_was_loaded_is_no_change(models: dict[str, Path], tmp_path: Path) -> None:
    """A real checkpoint's tokenizer_config.json records `local_files_only`, which the GGUF
    base's does not: not a reason to ship 3.5 MB of tokenizer."""
    checkpoint = shutil.copytree(models["checkpoint"], tmp_path / "checkpoint")
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "local_files_only": True, "is_local": False}))
    base_gen = _load(models["base"])
    manifest = write_delta(
        checkpoint, tmp_path / "delta", str(models["base"]), base_gen.model, base_gen.tokenizer
    )
    assert manifest["tokenizer"] == "base (chat template stored)"
    assert not (tmp_path / "delta" / "tokenizer.json").exists()
