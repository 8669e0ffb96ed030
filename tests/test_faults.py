"""The fault and hostile-input suite: each defect a probe found, kept fixed.

Every case runs the `rlkd` command as a user would and checks the promise: a one-line error
(`rlkd: error: ...`, exit 1, no traceback) that names the file, line, field or flag, and
nothing lost. See docs/reliability.md for what is promised and how each promise is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rlkd_cli.main import app


def fails(*args: str) -> str:
    """Run `rlkd ARGS`; assert it failed as promised and return its one error line."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rlkd: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def cache_args(model: Path, data: Path, root: Path) -> list[str]:
    return ["cache", "--model", str(model), "--dataset", str(data), "--cache-root", str(root)]


BAD_DATA = {
    "empty.jsonl": (b"", "the dataset file is empty"),
    "one_bad_line.jsonl": (b'{"text": "a b c"}\nnot json\n{"text": "d e"}\n', "line 2: not a JSON"),
    "latin1.jsonl": ('{"text": "caf\xe9"}\n'.encode("latin-1"), "line 1: not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_a_bad_dataset_file_is_named_with_its_line_not_called_missing(name, tmp_path, tiny_teacher):
    content, expected = BAD_DATA[name]
    data = tmp_path / name
    data.write_bytes(content)
    line = fails(*cache_args(tiny_teacher, data, tmp_path / "root"), "--text-field", "text")
    assert str(data) in line and expected in line
    assert "not found" not in line


def test_a_folder_of_files_with_different_columns_says_so(tmp_path, tiny_teacher):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    line = fails(*cache_args(tiny_teacher, folder, tmp_path / "root"))
    assert str(folder) in line and "share one set of columns" in line
    assert "not found" not in line


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    from conftest import SAMPLE, shallow_copy
    from rlkd_cache.cache import run_cache
    from rlkd_cache.config import CacheConfig

    cfg = CacheConfig(
        model=str(tiny_teacher),
        dataset=str(SAMPLE),
        split="train[:24]",
        top_k=16,
        positions="response",
        cache_root=str(tmp_path_factory.mktemp("caches")),
    )
    student = shallow_copy(tiny_teacher, tmp_path_factory.mktemp("student"))
    return {"cache": run_cache(cfg, progress=False), "student": student}


def train_args(setup: dict[str, Path], output: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--cache",
        str(setup["cache"]),
        "--student",
        str(setup["student"]),
        "--output",
        str(output),
        "--lr",
        "3e-3",
        "--max-steps",
        "8",
        "--batch-tokens",
        "512",
        "--save-every",
        "2",
        "--keep-last",
        "10",
        "--no-progress",
        *extra,
    ]


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(train_setup, tmp_path):
    import shutil

    from safetensors.torch import load_file

    whole = CliRunner().invoke(app, train_args(train_setup, tmp_path / "a"))
    assert whole.exit_code == 0, whole.stderr
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    newest = tmp_path / "b" / "checkpoints" / "step-00000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # --resume PATH stays strict: the damaged checkpoint it names is an error
    line = fails(*train_args(train_setup, tmp_path / "b", "--resume", str(newest.parent)))
    assert str(newest.parent) in line
    resumed = CliRunner().invoke(app, train_args(train_setup, tmp_path / "b"))
    assert resumed.exit_code == 0, resumed.stderr
    assert "skipping a damaged checkpoint" in resumed.stderr and "step-00000006" in resumed.stderr
    wa = load_file(tmp_path / "a" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_output_naming_an_existing_file_is_one_line(train_setup, tmp_path):
    output = tmp_path / "taken"
    output.write_text("not a run folder\n")
    line = fails(*train_args(train_setup, output))
    assert str(output) in line and "a file is there" in line
    assert output.read_text() == "not a run folder\n"
