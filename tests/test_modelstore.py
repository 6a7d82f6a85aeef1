"""The model store: publish by content hash, fetch once per node cache (concurrently safe),
verify, and resolve config references; the reader export from a store happens once."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from qaserve.config import EngineConfig
from qaserve.errors import ConfigError
from qaserve.modelstore import MANIFEST, is_reference, publish, resolve


def _model(root: Path) -> Path:
    src = root / "m"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return src


def test_publish_is_content_addressed_and_idempotent(tmp_path: Path) -> None:
    src = _model(tmp_path)
    ref = publish(src, str(tmp_path / "store"))
    assert ref.startswith("store:") and len(ref) == len("store:") + 64
    assert publish(src, f"file://{tmp_path / 'store'}") == ref  # same bytes, same entry
    entry = tmp_path / "store" / ref.removeprefix("store:")
    manifest = json.loads((entry / MANIFEST).read_text())
    assert set(manifest["files"]) == {"config.json", "sub/weights.bin"}
    # A changed byte is a different model.
    (src / "config.json").write_text('{"a": 2}')
    assert publish(src, str(tmp_path / "store")) != ref


def test_resolve_fetches_once_into_the_node_cache_and_verifies(tmp_path: Path) -> None:
    src = _model(tmp_path)
    store = str(tmp_path / "store")
    ref = publish(src, store)
    cache = tmp_path / "node-cache"
    local = Path(resolve(ref, cache, store))
    assert local.parent == cache / "models"
    assert (local / "sub" / "weights.bin").read_bytes() == (
        src / "sub" / "weights.bin"
    ).read_bytes()
    stamp = (local / "config.json").stat().st_mtime_ns
    assert resolve(ref, cache, store) == str(local)  # cached: not fetched again
    assert (local / "config.json").stat().st_mtime_ns == stamp
    # The full URI works without engine.model_store.
    digest = ref.removeprefix("store:")
    assert resolve(f"file://{store}/{digest}", tmp_path / "other", None).endswith(digest)
    # Hub ids and paths pass through untouched.
    assert resolve("deepset/minilm-uncased-squad2", cache, store) == "deepset/minilm-uncased-squad2"
    assert not is_reference("/models/reader") and is_reference("s3://bucket/x")


def test_a_corrupted_store_entry_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ref = publish(_model(tmp_path), str(store))
    entry = store / ref.removeprefix("store:")
    (entry / "sub" / "weights.bin").write_bytes(b"tampered")
    with pytest.raises(ConfigError, match="do not match"):
        resolve(ref, tmp_path / "cache", str(store))
    assert not list((tmp_path / "cache" / "models").glob("[0-9a-f]*"))  # nothing half-cached


def test_missing_store_and_missing_backend_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_store"):
        resolve("store:" + "0" * 64, tmp_path, None)
    with pytest.raises(ConfigError, match="no such store entry"):
        resolve("store:" + "0" * 64, tmp_path, str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"fsspec backend|no such store entry"):
        resolve("nosuchscheme://bucket/" + "0" * 64, tmp_path, None)


def _resolve_in_process(args: tuple[str, str, str]) -> str:
    return resolve(*args)


def test_concurrent_replicas_fetch_one_copy(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ref = publish(_model(tmp_path), store)
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        paths = pool.map(_resolve_in_process, [(ref, cache, store)] * 4)
    assert len(set(paths)) == 1
    leftovers = [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_engine_config_resolves_store_references(tmp_path: Path) -> None:
    """A single-file model (a GGUF) resolves to the file; a folder to the folder."""
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    store = str(tmp_path / "store")
    ref = publish(gguf, store)
    cfg = EngineConfig(
        cache_dir=tmp_path / "cache",
        model_store=store,
        generator={"model": ref},
        reader={"model": str(tmp_path / "unchanged")},
    )
    resolved = cfg.resolve_models()
    assert Path(resolved.generator.model).name == "tiny.gguf"
    assert Path(resolved.generator.model).read_bytes() == gguf.read_bytes()
    assert resolved.reader.model == str(tmp_path / "unchanged")
    assert cfg.generator.model == ref  # the loaded config is not changed in place
    plain = EngineConfig(cache_dir=tmp_path / "cache")
    assert plain.resolve_models() is plain


@pytest.mark.slow
def test_a_published_int8_reader_is_exported_once_and_served_from_the_store(
    tiny_engine_config: EngineConfig, tmp_path: Path
) -> None:
    """`publish-model --reader-int8` semantics: the published folder holds model.onnx, so a
    node's reader loads it as is (no export, no cache entry under reader/)."""
    from qaserve.deployments.reader import Reader

    assert tiny_engine_config.reader.model is not None
    exported = Path(tiny_engine_config.reader.model)
    assert (exported / "model.onnx").exists()
    store = str(tmp_path / "store")
    ref = publish(exported, store)
    cfg = tiny_engine_config.model_copy(
        update={"cache_dir": tmp_path / "node", "model_store": store}
    )
    cfg.reader = cfg.reader.model_copy(update={"model": ref})
    resolved = cfg.resolve_models()
    reader = Reader(resolved.reader, resolved.cache_dir, threads=1)
    answers = reader.read("How is the bass?", ["The bass is deep."], top_k=1)
    assert answers is not None
    assert not (tmp_path / "node" / "reader").exists()  # nothing was exported on the node
