"""The manifest: the last file a cache gets, and the only one readers trust.

`Manifest` is the typed form of `manifest.json`: the fingerprint and the identity it hashes,
the resolved config, the teacher, tokenizer and dataset identities, the backend, vocab size,
k, the log-prob step and its error bound, where the responses came from, per shard its name,
rows, positions, tokens, bytes, sha256 and top-k mass, the totals, the rows skipped (by
reason) or truncated, the rlkd version and the creation time. `to_json` is the document
written to disk (with `format` and `format_version`); `from_json` checks one and reads it.

`cache.py` builds a `Manifest` from the facts it resolved, without shards; the writer adds
the shards it wrote and writes it (`CacheWriter.finish`). A reader keeps both forms:
`Cache.manifest` is the document as read, which `rlkd inspect` shows and tests compare with
the file, keys this version does not type included; `Cache.info` is the `Manifest` that the
library reads (`cache.info.totals.positions`), so key names live here only and a misspelt
field fails where it is written.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

from rlkd_cache import __version__
from rlkd_cache.errors import RlkdError
from rlkd_cache.store import FORMAT_VERSION
from rlkd_cache.store.layout import CacheDir

FORMAT_NAME = "rlkd-cache"
"""The manifest's `format` value: what tells an rlkd cache from any other JSON."""


@dataclass(frozen=True)
class TeacherInfo:
    name: str
    path: str
    sha256: str
    """Hash of every file of the teacher's folder."""


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
        """The manifest document, as written to `manifest.json`."""
        return {
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

    @classmethod
    def from_json(cls, document: Any, source: Path) -> Manifest:
        """Check a manifest document (read from `source`) and type it; raise `RlkdError`
        naming `source` for a foreign, unknown-version or corrupt one."""
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
        try:
            return cls(
                fingerprint=document["fingerprint"],
                identity=document["identity"],
                config=document["config"],
                teacher=_record(TeacherInfo, document["teacher"]),
                tokenizer=_record(TokenizerInfo, document["tokenizer"]),
                dataset=document["dataset"],
                backend=_record(BackendInfo, document["backend"]),
                vocab_size=int(document["vocab_size"]),
                k=int(document["k"]),
                logprob_step=float(document["logprob_step"]),
                responses=_record(ResponsesInfo, document.get("responses", {"source": "dataset"})),
                skipped=document["skipped"],
                truncated=int(document["truncated"]),
                shards=tuple(_record(ShardEntry, s) for s in document["shards"]),
                rlkd_version=document["rlkd_version"],
                created=document["created"],
            )
        except KeyError as e:
            raise RlkdError(f"{source}: corrupt manifest, missing {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise RlkdError(f"{source}: corrupt manifest ({e})") from None


Record = TypeVar("Record")


def _record(cls: type[Record], value: dict[str, Any]) -> Record:
    """A record dataclass from its JSON object: its fields (a missing one from its default
    if it has one); other keys are ignored."""
    values = {}
    for f in fields(cls):
        if f.name in value:
            values[f.name] = value[f.name]
        elif f.default is MISSING:
            raise KeyError(f.name)
    return cls(**values)
