"""A content-addressed model store, so that every node of a cluster runs the same model bytes.

`publish(folder_or_file, store)` copies a model under `<store>/<sha256>/` with a manifest
(`qaserve-model.json`, written last, so an entry without it is incomplete). A config then
names the model `store:<sha256>` (resolved against `engine.model_store`) or by the entry's
full URI. On each node `resolve()` fetches the entry once into
`<cache_dir>/models/<sha256>/`: a temporary folder, every file checked against the
manifest, the whole checked against the digest, then one atomic rename under a file lock, so
replicas that start together fetch it once and never read a half-copied model.

The store is a local or shared path (NFS, EFS, a mounted volume) or `file://` natively, and
any other fsspec URL (`s3://`, `gs://`, `abfs://`, `hdfs://`) when that fsspec backend is
installed on the nodes. Hub ids and local directories in a config are left as they are.

Publishing an int8 reader export (`qaserve publish-model --reader-int8 CHECKPOINT`) runs the
export once, on the publishing machine; a published checkpoint is exported on each node by
the first replica, under the export cache's own lock (deployments/onnx_export.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qaserve.deployments.onnx_export import file_lock, move_into_place
from qaserve.errors import ConfigError

MANIFEST = "qaserve-model.json"
PREFIX = "store:"


# --- hashing --------------------------------------------------------------------------------


def _files(src: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of every file of a model folder, or of a single model file."""
    if src.is_file():
        return [(src.name, src)]
    found = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST)
    found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(src).parts)]
    if not found:
        raise ConfigError(f"{src}: no model files to publish")
    return [(p.relative_to(src).as_posix(), p) for p in found]


def files_sha256(paths: Iterable[Path]) -> str:
    """sha256 of the files' bytes, one after another (one file: its own sha256)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tree_digest(files: dict[str, str]) -> str:
    """The model's digest: a hash of its (name, file hash) pairs, independent of where it is."""
    lines = "".join(f"{name}\0{sha}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# --- where a store lives --------------------------------------------------------------------


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _fs(uri: str) -> tuple[Any, str]:
    """An fsspec filesystem and path for a remote store, or a clear error without the backend."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with the server extras
        raise ConfigError(f"model store {uri!r}: install fsspec to read remote stores") from None
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(
            f"model store {uri!r}: no fsspec backend for {scheme}:// on this node ({exc}); "
            f"install it (s3fs, gcsfs, adlfs, ...) or use a shared filesystem path"
        ) from None


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


# --- publishing -----------------------------------------------------------------------------


def publish(src: str | Path, store: str) -> str:
    """Copy a model folder (or one model file, such as a GGUF) into the store; return the
    `store:<digest>` reference a config names it by. Publishing the same bytes again is a no-op."""
    src = Path(src).expanduser()
    if not src.exists():
        raise ConfigError(f"{src}: no such model folder or file")
    files = _files(src)
    hashes = {name: files_sha256([path]) for name, path in files}
    digest = tree_digest(hashes)
    manifest = {
        "digest": digest,
        "source": str(src),
        "entry": src.name if src.is_file() else None,
        "files": {name: {"sha256": hashes[name], "size": p.stat().st_size} for name, p in files},
    }
    if _is_local(store):
        dest = _local(store) / digest
        if (dest / MANIFEST).exists():
            return PREFIX + digest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=dest.parent))
        try:
            _write_local(tmp, files, manifest)
            move_into_place(tmp, dest, MANIFEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        fs, root = _fs(store)
        dest_path = _join(root, digest)
        if not fs.exists(_join(dest_path, MANIFEST)):
            for name, path in files:
                fs.put_file(str(path), _join(dest_path, name))
            with fs.open(_join(dest_path, MANIFEST), "w") as f:  # last: marks it complete
                f.write(json.dumps(manifest, indent=2))
    return PREFIX + digest


def _write_local(dest: Path, files: list[tuple[str, Path]], manifest: dict[str, Any]) -> None:
    for name, path in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# --- resolving on a node --------------------------------------------------------------------


def is_reference(model: str | None) -> bool:
    """Whether a model field names a store entry (and not a hub id or a local path)."""
    if not model:
        return False
    return model.startswith(PREFIX) or "://" in model


def entry_uri(ref: str, store: str | None) -> str:
    if ref.startswith(PREFIX):
        if not store:
            raise ConfigError(
                f"model {ref!r} names the model store, but engine.model_store "
                "(or QASERVE_MODEL_STORE) is not set",
                field="model_store",
            )
        return _join(store, ref.removeprefix(PREFIX))
    return ref


def resolve(model: str, cache_dir: str | Path, store: str | None = None) -> str:
    """A local path for `model`: store references are fetched into `<cache_dir>/models/`
    (once per node, verified); anything else (hub id, local path) is returned unchanged."""
    if not is_reference(model):
        return model
    uri = entry_uri(model, store)
    digest = uri.rstrip("/").rsplit("/", 1)[-1]
    root = Path(cache_dir).expanduser() / "models"
    final = root / digest
    if not (final / MANIFEST).exists():
        root.mkdir(parents=True, exist_ok=True)

        with file_lock(root / f".{digest}.lock"):
            if not (final / MANIFEST).exists():  # another replica fetched it while we waited
                _fetch(uri, digest, root, final)
    manifest = json.loads((final / MANIFEST).read_text())
    return str(final / manifest["entry"]) if manifest.get("entry") else str(final)


def _fetch(uri: str, digest: str, root: Path, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=root))
    try:
        if _is_local(uri):
            src = _local(uri)
            if not (src / MANIFEST).exists():
                raise ConfigError(f"model {uri!r}: no such store entry (no {MANIFEST})")
            manifest = json.loads((src / MANIFEST).read_text())
            for name in manifest["files"]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, tmp / name)
        else:
            fs, path = _fs(uri)
            if not fs.exists(_join(path, MANIFEST)):
                raise ConfigError(f"model {uri!r}: no such store entry (no {MANIFEST})")
            with fs.open(_join(path, MANIFEST), "r") as f:
                manifest = json.loads(f.read())
            for name in manifest["files"]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(_join(path, name), str(tmp / name))
        _verify(tmp, manifest, digest, uri)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        move_into_place(tmp, final, MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _verify(folder: Path, manifest: dict[str, Any], digest: str, uri: str) -> None:
    """Every file matches the manifest and the manifest matches the digest in the name."""
    hashes = {name: files_sha256([folder / name]) for name in manifest["files"]}
    bad = [n for n, sha in hashes.items() if sha != manifest["files"][n]["sha256"]]
    if bad:
        raise ConfigError(f"model {uri!r}: files {bad} do not match the store's manifest")
    if tree_digest(hashes) != digest:
        raise ConfigError(f"model {uri!r}: its files do not hash to {digest}")
