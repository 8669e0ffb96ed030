"""Every local dataset form loads to the same rows, and slicing works on each."""

from __future__ import annotations

import json

import datasets
import pytest

from conftest import SAMPLE
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import load_rows, prepare
from rlkd_cache.errors import RlkdError

ROWS = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:8]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sources")
    ds = datasets.Dataset.from_list(ROWS)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "rows.json").write_text(json.dumps(ROWS))
    ds.to_parquet(str(folder / "rows.parquet"))
    ds.to_csv(str(folder / "rows.csv"), index=False)
    ds.save_to_disk(str(folder / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(folder / "dict")
    )
    return {
        name: str(folder / name)
        for name in ("rows.jsonl", "rows.json", "rows.parquet", "rows.csv", "saved", "dict")
    }


@pytest.mark.parametrize(
    "name", ["rows.jsonl", "rows.json", "rows.parquet", "rows.csv", "saved", "dict"]
)
def test_each_form_loads_the_same_rows(sources, name, tiny_tokenizer):
    rows = load_rows(sources[name], "train")
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS]
    sliced = load_rows(sources[name], "train[2:5]")
    assert [r["id"] for r in sliced] == [r["id"] for r in ROWS[2:5]]
    prepared = prepare(rows, tiny_tokenizer, CacheConfig())
    assert prepared.shape == "pair" and len(prepared.sequences) == len(ROWS)


def test_a_split_the_folder_lacks_is_named(sources):
    with pytest.raises(RlkdError, match="no split 'validation'"):
        load_rows(sources["dict"], "validation")
    assert len(load_rows(sources["dict"], "test")) == 2


def test_unsupported_file_type_is_named(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("hello")
    with pytest.raises(RlkdError, match=r"unsupported file type '\.txt'"):
        load_rows(str(path), "train")
