"""The manifest: the last file a cache gets, and the only one readers trust.

`Manifest` is the typed form of `manifest.json`: the fingerprint and the identity it hashes,
the resolved config, the teacher, tokenizer and dataset identities, the backend, vocab size,
k, the log-prob step and its error bound, where the responses came from, per shard its name,
rows, positions, tokens, bytes, sha256 and top-k mass, the totals, the rows skipped (by
reason) or truncated, the rlkd version and the creation time. `to_json` is the document
written to disk (with `format`, `format_version` and `digest`, the sha256 of the canonical
JSON of every other key); `from_json` checks one (its digest, where it has one; the type of
every field; shard names) and reads it.

`cache.py` builds a `Manifest` from the facts it resolved, without shards; the writer adds
the shards it wrote and writes it (`CacheWriter.finish`). A reader keeps both forms:
`Cache.manifest` is the document as read, which `rlkd inspect` shows and tests compare with
the file, keys this version does not type included; `Cache.info` is the `Manifest` that the
library reads (`cache.info.totals.positions`), so key names live here only and a misspelt
field fails where it is written.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import math
import types
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from rlkd_cache import __version__
from rlkd_cache.errors import RlkdError
from rlkd_cache.store import FORMAT_VERSION
from rlkd_cache.store.fingerprint import canonical_json
from rlkd_cache.store.layout import CacheDir

FORMAT_NAME = "rlkd-cache"
"""The manifest's `format` value: what tells an rlkd cache from any other JSON."""

DIGEST_KEY = "digest"


def digest(document: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (`canonical_json`) of a manifest document's keys other
    than its digest: what its `digest` key holds. Not part of the cache's identity."""
    rest = {key: value for key, value in document.items() if key != DIGEST_KEY}
    return hashlib.sha256(canonical_json(rest).encode()).hexdigest()


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    path: str
    sha256: str
    """Hash of every file of the teacher's folder; for a served teacher (`path` is then its
    tokenizer's folder), of the model name and context the servers report."""
    probe: dict[str, Any] | None = None
    """A served teacher's behavioural probe (`teacher/server.py`); None for the others."""


@dataclass(frozen=True)
class TokenizerInfo:
    sha256: str
    """Hash of the vocabulary, the special tokens and the chat template."""
    vocab_size: int
    eos_token_id: int | None
    vocab_sha256: str | None = None
    """Hash of the vocabulary alone: what a student's tokenizer must match (None in caches
    written before it was recorded)."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    why: str
    """Why this backend was chosen (`teacher/select.py`)."""
    version: str


@dataclass(frozen=True)
class ResponsesInfo:
    """Where the cached responses came from: the dataset, or the teacher, whose generations
    are saved in the cache (`CacheDir.RESPONSES`, with their sha256)."""

    source: Literal["dataset", "teacher"]
    sha256: str | None = None

    @classmethod
    def found_in(cls, layout: CacheDir) -> ResponsesInfo:
        if not layout.has_responses():
            return cls("dataset")
        return cls("teacher", layout.sha256(CacheDir.RESPONSES))

    def to_json(self) -> dict[str, Any]:
        if self.source == "dataset":
            return {"source": "dataset"}
        return {"source": "teacher", "file": CacheDir.RESPONSES, "sha256": self.sha256}


@dataclass(frozen=True)
class ShardEntry:
    """One complete shard, as the writer wrote it."""

    name: str
    rows: int
    positions: int
    tokens: int
    bytes: int
    sha256: str
    topk_mass_sum: float
    """Sum over its positions of the teacher's top-k probability mass."""

    @classmethod
    def from_json(cls, value: Any) -> ShardEntry:
        """An entry from its JSON object (a manifest's, or a shard's record); raise KeyError
        or TypeError for a missing or mistyped field."""
        return _record(cls, value)


@dataclass(frozen=True)
class Totals:
    shards: int
    rows: int
    positions: int
    tokens: int
    bytes: int
    bytes_per_position: float
    mean_topk_mass: float

    @classmethod
    def of(cls, shards: Sequence[ShardEntry]) -> Totals:
        positions = sum(s.positions for s in shards)
        size = sum(s.bytes for s in shards)
        return cls(
            shards=len(shards),
            rows=sum(s.rows for s in shards),
            positions=positions,
            tokens=sum(s.tokens for s in shards),
            bytes=size,
            bytes_per_position=size / max(positions, 1),
            mean_topk_mass=sum(s.topk_mass_sum for s in shards) / max(positions, 1),
        )


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a cache holds and how it was made (see the module docstring)."""

    fingerprint: str
    identity: dict[str, Any]
    """What the fingerprint hashes (built by `cache.py`)."""
    config: dict[str, Any]
    """The resolved cache config, without the cache root."""
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    dataset: dict[str, Any]
    """`data.dataset_identity` (source, split, content hash), the row shape and the template."""
    backend: BackendInfo
    vocab_size: int
    k: int
    logprob_step: float
    responses: ResponsesInfo
    skipped: dict[str, int]
    """Rows left out, by reason."""
    truncated: int
    """Rows cut to the max length."""
    shards: tuple[ShardEntry, ...] = ()
    rlkd_version: str = __version__
    created: str = field(default_factory=_now)

    @property
    def max_logprob_error(self) -> float:
        """The bound on every stored log-prob's error (half the quantization step)."""
        return self.logprob_step / 2

    @property
    def totals(self) -> Totals:
        return Totals.of(self.shards)

    def to_json(self) -> dict[str, Any]:
        """The manifest document, as written to `manifest.json`, with its digest."""
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "identity": self.identity,
            "config": self.config,
            "teacher": asdict(self.teacher),
            "tokenizer": asdict(self.tokenizer),
            "dataset": self.dataset,
            "backend": asdict(self.backend),
            "vocab_size": self.vocab_size,
            "k": self.k,
            "logprob_step": self.logprob_step,
            "max_logprob_error": self.max_logprob_error,
            "responses": self.responses.to_json(),
            "skipped": self.skipped,
            "truncated": self.truncated,
            "shards": [asdict(s) for s in self.shards],
            "totals": asdict(self.totals),
            "rlkd_version": self.rlkd_version,
            "created": self.created,
        }
        return {**document, DIGEST_KEY: digest(document)}

    @classmethod
    def from_json(cls, document: Any, source: Path) -> Manifest:
        """Check a manifest document (read from `source`) and type it; raise `RlkdError`
        naming `source` for a foreign, unknown-version, edited or corrupt one."""
        if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
            raise RlkdError(
                f'{source}: not an rlkd cache manifest (expected "format": "{FORMAT_NAME}")'
            )
        version = document.get("format_version")
        if version != FORMAT_VERSION:
            raise RlkdError(
                f"{source}: cache format version {version!r} is not supported "
                f"(this rlkd reads version {FORMAT_VERSION})"
            )
        if DIGEST_KEY in document and document[DIGEST_KEY] != digest(document):
            raise RlkdError(
                f"{source}: the manifest does not match its digest: it was edited or damaged "
                "after it was written"
            )
        values = {"responses": {"source": "dataset"}, **document}  # older caches: no responses
        try:
            manifest = _record(cls, {f.name: values[f.name] for f in fields(cls)})
        except KeyError as e:
            raise RlkdError(f"{source}: corrupt manifest, missing {e}") from None
        except (TypeError, ValueError) as e:
            raise RlkdError(f"{source}: corrupt manifest ({e})") from None
        manifest._check(source)
        return manifest

    def _check(self, source: Path) -> None:
        """Raise `RlkdError` naming `source` for values no rlkd writes: a shard name that is
        not exactly a shard file name (a path, `..`, a URL), a shard listed twice, a negative
        count, k or the vocabulary below 1, a step that is not a positive number."""
        seen: set[str] = set()
        for entry in self.shards:
            if CacheDir.shard_index(entry.name) is None:
                raise RlkdError(
                    f"{source}: shard name {entry.name!r} is not a shard file name "
                    "(shard-NNNNN.parquet, in the cache directory)"
                )
            if entry.name in seen:
                raise RlkdError(f"{source}: shard {entry.name!r} is listed twice")
            seen.add(entry.name)
            if min(entry.rows, entry.positions, entry.tokens, entry.bytes) < 0:
                raise RlkdError(f"{source}: shard {entry.name!r} has a negative count")
        if self.k < 1 or self.vocab_size < 1:
            raise RlkdError(f"{source}: k={self.k} and vocab_size={self.vocab_size} must be >= 1")
        if not (self.logprob_step > 0 and math.isfinite(self.logprob_step)):
            raise RlkdError(f"{source}: logprob_step={self.logprob_step} must be positive")


Record = TypeVar("Record")


def _record(cls: type[Record], value: Any) -> Record:
    """A record dataclass from its JSON object: its fields (a missing one from its default
    if it has one), each checked against its type (records and tuples of records built
    from their JSON); other keys are ignored. Raise KeyError for a missing field, TypeError
    for a value of the wrong type."""
    if not isinstance(value, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {value!r:.40}")
    hints = _hints(cls)
    values = {}
    for f in fields(cls):
        if f.name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                raise KeyError(f.name)
            continue
        values[f.name] = _typed(f"{cls.__name__}.{f.name}", value[f.name], hints[f.name])
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a record class (computed once per class)."""
    return get_type_hints(cls)


def _typed(name: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` (a record, a tuple of records, a union, a literal, a plain
    or generic class), checked; raise TypeError naming the field `name` otherwise."""
    origin, args = get_origin(hint), get_args(hint)
    if is_dataclass(hint):
        return _record(hint, value)
    if origin is tuple:
        if isinstance(value, list):
            return tuple(_typed(name, v, args[0]) for v in value)
    elif origin is Literal:
        if value in args:
            return value
    elif origin in (Union, types.UnionType):
        for option in args:
            with contextlib.suppress(TypeError):
                return _typed(name, value, option)
    elif _is_a(value, origin or hint):
        return value
    raise TypeError(f"{name}: expected {getattr(hint, '__name__', hint)}, got {value!r:.40}")


def _is_a(value: Any, cls: type) -> bool:
    """`isinstance` for JSON values: an int is a float too, a bool is neither."""
    if isinstance(value, bool):
        return cls is bool
    return isinstance(value, (int, float) if cls is float else cls)
