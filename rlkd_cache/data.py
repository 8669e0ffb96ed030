"""Datasets -> token sequences with the positions to distil.

Rows come through the `datasets` library (local JSONL/JSON/Parquet/CSV, a saved dataset
folder, or a hub name when online) in one of three shapes: plain text, prompt + response, or
chat messages. Prompt/response and messages are rendered with the tokenizer's chat template
(piece by piece, so response tokens are known exactly). Position t of a sequence is the
teacher's distribution of token t+1 given tokens 0..t; the last token has no successor and is
never distilled. Bad rows are skipped and counted by reason, or fail under `strict`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from rlkd_cache.config import CacheConfig
from rlkd_cache.errors import RlkdError

RowShape = Literal["text", "pair", "messages"]

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Sequence:
    """One tokenized example, ready for the teacher."""

    seq_id: str
    input_ids: np.ndarray  # (T,) int32
    positions: np.ndarray  # (P,) int32, sorted; position t predicts input_ids[t + 1]


@dataclass
class Prepared:
    """The tokenized dataset plus what was skipped or truncated, by reason."""

    sequences: list[Sequence]
    shape: RowShape
    template: Literal["chat", "none"]
    skipped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0


def bundled_sample() -> Path:
    """The sample dataset that ships with rlkd (instruction prompts with responses)."""
    spec = importlib.util.find_spec("rlkd_pipelines")
    roots = list(spec.submodule_search_locations or []) if spec else []
    roots.append(str(Path(__file__).resolve().parent.parent / "pipelines"))
    for root in roots:
        path = Path(root) / "data" / "sample.jsonl"
        if path.is_file():
            return path
    raise RlkdError("the bundled sample dataset (pipelines/data/sample.jsonl) is not installed")


def load_rows(dataset: str | None, split: str) -> Any:
    """Load one split as a `datasets.Dataset`; raise `RlkdError` if it cannot be found."""
    import datasets

    datasets.disable_progress_bars()
    source = str(bundled_sample()) if dataset is None else dataset
    path = Path(source)
    base_split = split.split("[", 1)[0]
    try:
        if path.is_dir() and any((path / n).exists() for n in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if base_split not in loaded:
                    raise RlkdError(f"{path}: no split {base_split!r}; has {sorted(loaded)}")
                loaded = loaded[base_split]
            if "[" in split:
                loaded = _slice(loaded, split)
            return loaded
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise RlkdError(
                    f"{path}: unsupported file type {path.suffix!r}; expected one of "
                    f"{sorted(FILE_BUILDERS)}"
                )
            if builder in ("json", "csv"):
                check_utf8(path)
            return datasets.load_dataset(builder, data_files={base_split: str(path)}, split=split)
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        if source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
            raise FileNotFoundError(source)
        return datasets.load_dataset(source, split=split)
    except RlkdError:
        raise
    except Exception as e:  # datasets raises many types for "not found" / "offline"
        if path.exists():
            raise RlkdError(unreadable(path, e)) from None
        raise RlkdError(
            f"dataset not found: {source} (expected a local JSONL/JSON/Parquet/CSV file, a saved "
            f"dataset folder, or a hub name reachable online; {type(e).__name__}: {e})"
        ) from None


def rows_between(ds: Any, start: int, stop: int) -> Any:
    """The rows `[start, stop)` of a loaded split, read lazily (a view of the memory-mapped
    table)."""
    return ds.select(range(start, stop))


def check_utf8(path: Path) -> None:
    """Refuse a text dataset file that is not UTF-8, naming the line (pyarrow would load it
    and fail only when a row is read)."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                raise RlkdError(
                    f"{path}, line {number}: not UTF-8 text ({bad.reason} at byte {bad.start} "
                    "of the line); re-encode the file as UTF-8"
                ) from None


def unreadable(path: Path, error: Exception) -> str:
    """Why an existing dataset file or folder could not be loaded, as precisely as we can
    tell: an empty file, the first line of a JSON Lines file that is not UTF-8 or not JSON,
    or (for a folder) files whose columns differ; else the library's own root cause."""
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    why = f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    if path.is_dir():
        return (
            f"cannot read the dataset folder {path}: its data files must share one set of "
            f"columns and one format ({why})"
        )
    if path.stat().st_size == 0:
        return f"{path}: the dataset file is empty (expected rows)"
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as fh:  # UTF-8 was checked before loading
            for number, line in enumerate(fh, start=1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"{path}, line {number}: not a JSON object ({bad.msg})"
    return f"cannot read the dataset {path} ({why})"


def _slice(ds: Any, split: str) -> Any:
    """Apply `name[a:b]` slicing (row indices, or percentages) to a loaded Dataset."""
    import datasets

    instruction = datasets.ReadInstruction.from_spec(split)
    absolute = instruction.to_absolute({split.split("[", 1)[0]: len(ds)})[0]
    start, end = absolute.from_ or 0, absolute.to if absolute.to is not None else len(ds)
    return ds.select(range(start, end))


def dataset_identity(dataset: str | None, split: str, ds: Any) -> dict[str, str]:
    """Identity of the data for the cache fingerprint: the content hash of local files,
    or the `datasets` fingerprint (which includes the revision) for a hub dataset."""
    source = str(bundled_sample()) if dataset is None else dataset
    path = Path(source)
    if path.exists():
        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        digest = hashlib.sha256()
        for f in files:
            digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        content = digest.hexdigest()
    else:
        content = str(getattr(ds, "_fingerprint", ""))
    return {
        "source": source if dataset is not None else "bundled:sample.jsonl",
        "split": split,
        "content_sha256": content,
    }


def detect_shape(cfg: CacheConfig, columns: list[str]) -> tuple[RowShape, list[str]]:
    """Which row shape the config asks for (or the columns imply), and its fields."""
    if cfg.messages_field:
        shape, fields = "messages", [cfg.messages_field]
    elif cfg.prompt_field or cfg.response_field:
        if not (cfg.prompt_field and cfg.response_field):
            raise RlkdError("--prompt-field and --response-field must be given together")
        shape, fields = "pair", [cfg.prompt_field, cfg.response_field]
    elif cfg.text_field:
        shape, fields = "text", [cfg.text_field]
    elif "messages" in columns:
        shape, fields = "messages", ["messages"]
    elif "prompt" in columns and "response" in columns:
        shape, fields = "pair", ["prompt", "response"]
    elif "text" in columns:
        shape, fields = "text", ["text"]
    else:
        raise RlkdError(
            f"cannot tell which columns to use among {columns}: pass --text-field, "
            "--prompt-field/--response-field or --messages-field"
        )
    for name in fields:
        if name not in columns:
            raise RlkdError(f"field {name!r} is missing in every row; the columns are {columns}")
    return shape, fields  # type: ignore[return-value]


class BadRow(Exception):
    """A row that cannot be used; `reason` is a short counter key like `empty:text`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None:
        raise BadRow(f"missing:{name}", f"field {name!r} is missing")
    if not isinstance(value, str):
        raise BadRow(
            f"wrong_type:{name}", f"field {name!r} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise BadRow(f"empty:{name}", f"field {name!r} is empty")
    return value


def _messages(row: dict[str, Any], name: str) -> list[dict[str, str]]:
    value = row.get(name)
    if value is None:
        raise BadRow(f"missing:{name}", f"field {name!r} is missing")
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok:
        raise BadRow(
            f"wrong_type:{name}", f"field {name!r} must be a list of {{role, content}} strings"
        )
    if not value or not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise BadRow(f"empty:{name}", f"field {name!r} has no non-empty assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def segments(
    row: dict[str, Any], shape: RowShape, fields: list[str], template: str, tokenizer: Any
) -> list[tuple[str, bool]]:
    """Split a row into (text, is_response) pieces whose concatenation is the full text."""
    if shape == "text":
        return [(_text(row, fields[0]), True)]
    if shape == "pair":
        prompt, response = _text(row, fields[0]), _text(row, fields[1])
        if template == "none":
            return [(prompt, False), (response, True)]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    else:
        messages = _messages(row, fields[0])
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(
            messages[:i], add_generation_prompt=True, tokenize=False
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prefix.startswith(done) and upto.startswith(prefix)):
            raise BadRow(
                "template_not_prefix", "the chat template does not render turns as prefixes"
            )
        pieces += [(prefix[len(done) :], False), (upto[len(prefix) :], True)]
        done = upto
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(done):
        raise BadRow("template_not_prefix", "the chat template does not render turns as prefixes")
    if full[len(done) :]:
        pieces.append((full[len(done) :], False))
    return [p for p in pieces if p[0]]


def tokenize_row(
    pieces: list[tuple[str, bool]], template: str, tokenizer: Any
) -> tuple[list[int], list[bool]]:
    """Token ids and a per-token "is response" flag. Plain text gets the tokenizer's own
    special tokens (BOS) and a closing EOS; chat text carries its special tokens inline."""
    ids: list[int] = []
    response: list[bool] = []
    for i, (text, is_response) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=(template == "none" and i == 0))["input_ids"]
        ids += piece
        response += [is_response] * len(piece)
    eos = tokenizer.eos_token_id
    if template == "none" and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        response.append(pieces[-1][1])
    return ids, response


@dataclass(frozen=True)
class Preparation:
    """How the rows of one dataset become sequences: their shape, the fields read, and the
    template, decided once from the columns, the tokenizer and the config."""

    shape: RowShape
    fields: list[str]
    template: Literal["chat", "none"]

    @classmethod
    def of(cls, columns: list[str], tokenizer: Any, cfg: CacheConfig) -> Preparation:
        shape, fields = detect_shape(cfg, columns)
        has_chat = getattr(tokenizer, "chat_template", None) is not None
        template = cfg.template if cfg.template != "auto" else ("chat" if has_chat else "none")
        if shape == "messages" and template == "none":
            raise RlkdError(
                "messages rows need a chat template; the tokenizer has none (or --template none)"
            )
        if template == "chat" and not has_chat and shape != "text":
            raise RlkdError("--template chat: the teacher's tokenizer has no chat template")
        if shape == "text":
            template = "none"
        if cfg.id_field and cfg.id_field not in columns:
            raise RlkdError(
                f"field {cfg.id_field!r} is missing in every row; the columns are {columns}"
            )
        return cls(shape, fields, template)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Prepped:
    """What became of one row: its sequence, or why it was skipped; and whether it was
    truncated to `max_length`."""

    sequence: Sequence | None
    skipped: str | None = None
    truncated: bool = False


def prepare_row(
    row: dict[str, Any], index: int, how: Preparation, tokenizer: Any, cfg: CacheConfig
) -> Prepped:
    """Row `index` of the split as a sequence (or the reason it is skipped; under `strict`,
    `RlkdError` naming the row instead)."""
    try:
        pieces = segments(row, how.shape, how.fields, how.template, tokenizer)
        ids, response = tokenize_row(pieces, how.template, tokenizer)
    except BadRow as bad:
        if cfg.strict:
            raise RlkdError(f"row {index}: {bad} (reason {bad.reason})") from None
        return Prepped(None, bad.reason)
    truncated = len(ids) > cfg.max_length
    if truncated:
        ids, response = ids[: cfg.max_length], response[: cfg.max_length]
    nxt = np.asarray(response[1:], dtype=bool)
    keep = nxt if cfg.positions == "response" else np.ones_like(nxt)
    positions = np.flatnonzero(keep).astype(np.int32)
    if positions.size == 0:
        if cfg.strict:
            raise RlkdError(f"row {index}: no positions left to distil (after truncation)")
        return Prepped(None, "no_distilled_positions", truncated)
    seq_id = str(row[cfg.id_field]) if cfg.id_field else str(index)
    return Prepped(Sequence(seq_id, np.asarray(ids, dtype=np.int32), positions), None, truncated)


def prepare(ds: Any, tokenizer: Any, cfg: CacheConfig) -> Prepared:
    """Tokenize every row of a (small) dataset in memory; skip (or, under `strict`, fail on)
    bad rows, naming index and field. `rlkd cache` streams instead (`plan.py`)."""
    how = Preparation.of(list(ds.column_names), tokenizer, cfg)
    out = Prepared(sequences=[], shape=how.shape, template=how.template)
    for index, row in enumerate(ds):
        done = prepare_row(row, index, how, tokenizer, cfg)
        out.truncated += done.truncated
        if done.sequence is None:
            out.skipped[done.skipped or ""] += 1
        else:
            out.sequences.append(done.sequence)
    if not out.sequences:
        raise RlkdError(f"no usable rows in the dataset; skipped by reason: {dict(out.skipped)}")
    return out
