"""`--responses teacher`: the teacher writes the responses it is then cached on.

For each prompt row (prompt/response or messages: the conversation before the last assistant
turn), the prompt is rendered with the chat template and the teacher generates a response
with the configured, seeded sampling settings. The generations are saved in the cache
(`CacheDir.write_responses`: seq_id, prompt, response) before scoring starts, so a resumed
run reuses them and `rlkd eval --generate` can use them as references. The rows then
go through the normal path with the generated text as their response.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from rlkd_cache.config import CacheConfig
from rlkd_cache.data import BadRow, _messages, _text
from rlkd_cache.errors import RlkdError
from rlkd_cache.store.layout import CacheDir

log = logging.getLogger("rlkd.responses")


def prompt_of(row: dict[str, Any], shape: str, fields: list[str]) -> list[dict[str, str]]:
    """The conversation the teacher answers: the user prompt, or the messages before the
    last assistant turn (which is replaced)."""
    if shape == "pair":
        return [{"role": "user", "content": _text(row, fields[0])}]
    messages = _messages(row, fields[0]) if row.get(fields[0]) else []
    last = max(
        (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages)
    )
    if not messages[:last]:
        raise BadRow(f"empty:{fields[0]}", f"field {fields[0]!r} has no prompt before its answer")
    return messages[:last]


def shape_for_teacher(cfg: CacheConfig, columns: list[str]) -> tuple[str, list[str]]:
    """Row shape for teacher responses: only the prompt side must exist."""
    if cfg.messages_field or (not cfg.prompt_field and "messages" in columns):
        name = cfg.messages_field or "messages"
        if name not in columns:
            raise RlkdError(f"field {name!r} is missing in every row; the columns are {columns}")
        return "messages", [name]
    prompt = cfg.prompt_field or "prompt"
    if prompt not in columns:
        raise RlkdError(
            f"--responses teacher needs prompts: field {prompt!r} is missing in every row; "
            f"the columns are {columns} (pass --prompt-field or --messages-field)"
        )
    return "pair", [prompt, cfg.response_field or "response"]


def with_teacher_responses(
    rows: Any, tokenizer: Any, cfg: CacheConfig, layout: CacheDir, backend: Any, progress: bool
) -> Any:
    """Return `rows` with every usable prompt's response written by the teacher."""
    import datasets

    if getattr(tokenizer, "chat_template", None) is None:
        raise RlkdError("--responses teacher needs a teacher tokenizer with a chat template")
    shape, fields = shape_for_teacher(cfg, list(rows.column_names))
    records = [dict(r) for r in rows]
    ids = [str(r[cfg.id_field]) if cfg.id_field else str(i) for i, r in enumerate(records)]
    usable: list[int] = []
    prompts: list[list[dict[str, str]]] = []
    for index, record in enumerate(records):
        try:
            prompts.append(prompt_of(record, shape, fields))
            usable.append(index)
        except BadRow as bad:
            if cfg.strict:
                raise RlkdError(f"row {index}: {bad} (reason {bad.reason})") from None
    if layout.has_responses():
        path = layout.file(CacheDir.RESPONSES)
        saved = layout.read_responses().to_pydict()
        if saved["seq_id"] != [ids[i] for i in usable]:
            raise RlkdError(f"{path}: saved responses do not match this dataset's rows; delete it")
        texts = saved["response"]
        log.info("reusing the %d teacher responses in %s", len(texts), path)
    else:
        rendered = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
        generated = backend.generate(token_ids, cfg, progress=progress)
        texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
        layout.write_responses(
            pa.table({"seq_id": [ids[i] for i in usable], "prompt": rendered, "response": texts})
        )
    for index, prompt, text in zip(usable, prompts, texts, strict=True):
        if shape == "pair":
            records[index][fields[1]] = text
        else:
            records[index][fields[0]] = [*prompt, {"role": "assistant", "content": text}]
    return datasets.Dataset.from_list(records)  # same order: row-index seq ids are kept
