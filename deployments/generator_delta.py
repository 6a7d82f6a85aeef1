"""A fine-tuned generator shipped as the tensors it changed, applied over its base model.

Fine-tuning the packaged SmolLM2 (a 98 MB Q4_1 GGUF) with frozen lower layers changes about
half of its weights, yet a full checkpoint weighs 269 MB in bf16. A delta folder holds only
the tensors that differ from the dequantised base (2-D matrices as symmetric int8 per output
row with fp32 scales, 1-D tensors in fp32), a manifest naming the exact base (file name,
size, sha256: a delta over another base would load silently wrong, so it is refused), and
the chat template training used (the whole tokenizer only where it differs from the base's).

`generator.model: <delta folder>` loads the base as usual, then overwrites those tensors.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qaserve.errors import ConfigError
from qaserve.modelstore import files_sha256

FORMAT = "qaserve-generator-delta"
VERSION = 1
MANIFEST = "generator_delta.json"
WEIGHTS = "delta.safetensors"
CHAT_TEMPLATE = "chat_template.jinja"
PACKAGED = "packaged"  # the base's source when it is the packaged SmolLM2 GGUF
QUANTISATION = "int8-symmetric-per-row"
_SCALE = ".int8_scale"  # suffix of a quantised matrix's per-row scales in WEIGHTS
# What save_pretrained writes for a tokenizer (besides the chat template).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.json",
)
# tokenizer_config.json keys that record how a tokenizer was loaded, not what it does.
_LOAD_KEYS = frozenset({"local_files_only", "is_local", "name_or_path", "_name_or_path"})


# --- the base model ----------------------------------------------------------------------------


def _weight_files(path: Path) -> list[Path]:
    """The files whose bytes define a base: the GGUF itself, or a folder's weights."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise ConfigError(f"base model {str(path)!r} holds no weights", "model")
    return files


@dataclass(frozen=True)
class BaseModel:
    """The model a delta applies to: where it is found and which bytes it must have."""

    source: str  # PACKAGED, or the path of a GGUF file or model folder
    file: str  # file name(s) of its weights, comma-separated
    size: int
    sha256: str

    @classmethod
    def describe(cls, model: str) -> BaseModel:
        """A local GGUF file or model folder (a hub id has no bytes to pin down)."""
        from qaserve.config import packaged_generator

        path = Path(model).expanduser()
        if not path.exists():
            raise ConfigError(f"base model {model!r}: not a local GGUF file or folder", "base")
        packaged = Path(packaged_generator())
        same = packaged.is_file() and path.is_file() and path.samefile(packaged)
        files = _weight_files(path)
        return cls(
            source=PACKAGED if same else str(path.absolute()),
            file=",".join(f.name for f in files),
            size=sum(f.stat().st_size for f in files),
            sha256=files_sha256(files),
        )

    def locate(self) -> str:
        """The base's path, checked to be the very model the delta was made from."""
        from qaserve.config import packaged_generator

        model = packaged_generator() if self.source == PACKAGED else self.source
        path = Path(model)
        if not path.exists():
            raise ConfigError(
                f"the generator delta's base model {model!r} ({self.file}) is missing", "model"
            )
        files = _weight_files(path)
        found = (",".join(f.name for f in files), sum(f.stat().st_size for f in files))
        if found != (self.file, self.size) or files_sha256(files) != self.sha256:
            raise ConfigError(
                f"the generator delta was made for base {self.file} ({self.size} bytes, sha256 "
                f"{self.sha256[:12]}...), but {model!r} holds another model: refused",
                "model",
            )
        return model


# --- int8 matrices ---------------------------------------------------------------------------


def quantise_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: weight ~= q * scale[:, None]."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantise_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


# --- writing -------------------------------------------------------------------------------------


def _checkpoint_tensors(checkpoint: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in their stored dtype (bf16 from train-generator)."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r} holds no safetensors weights", "checkpoint"
        )
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  # safe_open is not a Mapping
                yield name, f.get_tensor(name)


def changed_tensors(
    checkpoint: Path, base: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's tensors that differ from the base's, and the names of those that do not.

    Equal means equal to the base rounded to the checkpoint's dtype: a frozen layer saved in
    bf16 is the fp32 base rounded, not a change (freeze settings are not trusted: compared)."""
    changed: dict[str, torch.Tensor] = {}
    same: list[str] = []
    for name, tensor in _checkpoint_tensors(checkpoint):
        if name not in base:
            raise ConfigError(f"checkpoint tensor {name!r} is not in the base model", "base")
        ref = base[name]
        if ref.shape != tensor.shape:
            raise ConfigError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the base's "
                f"{tuple(ref.shape)}: another architecture",
                "base",
            )
        if torch.equal(ref.to(tensor.dtype), tensor):
            same.append(name)
        else:
            changed[name] = tensor
    return changed, same


def _same_file(a: Path, b: Path) -> bool:
    """Equal bytes, or equal JSON but for how the tokenizer was loaded (local_files_only...)."""
    if filecmp.cmp(a, b, shallow=False):
        return True
    if a.suffix != ".json":
        return False
    try:
        ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    except ValueError:
        return False
    if not (isinstance(ja, dict) and isinstance(jb, dict)):
        return False
    return {k: v for k, v in ja.items() if k not in _LOAD_KEYS} == {
        k: v for k, v in jb.items() if k not in _LOAD_KEYS
    }


def _tokenizer_differs(checkpoint: Path, base_tokenizer: Any) -> bool:
    """Whether the checkpoint's tokenizer files differ from what the base's tokenizer saves."""
    with tempfile.TemporaryDirectory() as tmp:
        base_tokenizer.save_pretrained(tmp)
        for name in _TOKENIZER_FILES:
            mine, theirs = checkpoint / name, Path(tmp) / name
            if mine.is_file() != theirs.is_file():
                return True
            if mine.is_file() and not _same_file(mine, theirs):
                return True
    return False


def write_delta(
    checkpoint: Path, dest: Path, base: str, base_model: Any, base_tokenizer: Any
) -> dict[str, Any]:
    """Write the delta folder of `checkpoint` over `base` (loaded as `base_model`); returns
    its manifest, with the names of the tensors skipped as equal under "skipped"."""
    from safetensors.torch import save_file

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} is not a folder", "checkpoint")
    described = BaseModel.describe(base)
    base_state = base_model.state_dict()
    changed, same = changed_tensors(checkpoint, base_state)
    out: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for name, tensor in changed.items():
        if tensor.dim() == 2:
            q, scale = quantise_rows(tensor)
            out[name], out[name + _SCALE] = q, scale
            tensors[name] = {"shape": list(tensor.shape), "dtype": "int8"}
        else:
            out[name] = tensor.float().contiguous()
            tensors[name] = {"shape": list(tensor.shape), "dtype": "float32"}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(out, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    (tmp / WEIGHTS).chmod(0o644)  # safetensors writes 0600: a shipped file is readable
    tokenizer = _tokenizer_differs(checkpoint, base_tokenizer)
    names = _TOKENIZER_FILES if tokenizer else ()
    for name in (*names, CHAT_TEMPLATE):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, tmp / name)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "base": vars(described),
        "quantisation": {
            "matrices": QUANTISATION,
            "scales": "float32",
            "vectors": "float32",
        },
        "tokenizer": "stored" if tokenizer else "base (chat template stored)",
        "tensors": tensors,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return {**manifest, "skipped": same}


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorDelta:
    """A delta folder, read and checked; `apply` it to the loaded base."""

    folder: Path
    base: BaseModel
    tensors: Mapping[str, Mapping[str, Any]]
    tokenizer_stored: bool

    @classmethod
    def open(cls, model: str) -> GeneratorDelta | None:
        """The delta at `model`, or None where `model` is not a delta folder."""
        folder = Path(model).expanduser()
        if not (folder / MANIFEST).is_file():
            return None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            fmt, version = manifest.get("format"), manifest.get("version")
            if fmt != FORMAT or version != VERSION:
                raise ConfigError(
                    f"{str(folder)!r}: format {fmt!r} version {version!r}, "
                    f"expected {FORMAT!r} version {VERSION}",
                    "model",
                )
            return cls(
                folder=folder,
                base=BaseModel(**manifest["base"]),
                tensors=manifest["tensors"],
                tokenizer_stored=manifest.get("tokenizer") == "stored",
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{str(folder)!r}: unreadable generator delta ({exc})", "model"
            ) from None

    def apply(self, model: Any, tokenizer: Any) -> Any:
        """Overwrite the base's tensors with the stored ones (dequantised to the model's
        dtype); returns the tokenizer training used (the base's with its chat template, or
        the stored one)."""
        from safetensors import safe_open

        params = model.state_dict(keep_vars=True)
        with safe_open(str(self.folder / WEIGHTS), framework="pt") as f, torch.no_grad():
            for name, spec in self.tensors.items():
                if name not in params or list(params[name].shape) != spec["shape"]:
                    raise ConfigError(
                        f"generator delta tensor {name!r} does not fit the base model", "model"
                    )
                value = f.get_tensor(name)
                if spec["dtype"] == "int8":
                    value = dequantise_rows(value, f.get_tensor(name + _SCALE))
                target = params[name]
                target.data.copy_(value.to(target.dtype))
        if self.tokenizer_stored:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(self.folder))
        template = self.folder / CHAT_TEMPLATE
        if template.is_file():
            tokenizer.chat_template = template.read_text()
        return tokenizer
