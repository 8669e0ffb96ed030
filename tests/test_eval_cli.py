"""`rlkd eval` end to end on tiny local models: the metrics, ROUGE-L, --compare and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from conftest import SAMPLE, build_llama, build_tokenizer, shallow_copy
from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig, TrainConfig
from rlkd_cache.eval.metrics import CONSISTENCY_KS, OVERLAP_KS
from rlkd_cache.eval.run import RESULTS
from rlkd_cache.store.reader import Cache
from rlkd_cache.train.loop import train
from rlkd_cli.main import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    common = {
        "model": str(tiny_teacher),
        "dataset": str(SAMPLE),
        "cache_root": str(root),
        "positions": "response",
    }
    greedy = {"responses": "teacher", "gen_max_new_tokens": 12, "gen_temperature": 0.0}
    return {
        "train": run_cache(CacheConfig(split="train[:16]", top_k=16, **common), progress=False),
        "eval": run_cache(CacheConfig(split="train[300:310]", top_k=16, **common), progress=False),
        "teacher": run_cache(
            CacheConfig(split="train[:6]", top_k=4, **greedy, **common), progress=False
        ),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher, caches) -> dict[str, Path]:
    """Two short `rlkd train` runs of a 1-layer student cut from the teacher."""
    base = tmp_path_factory.mktemp("runs")
    student = shallow_copy(tiny_teacher, base / "student")
    out = {}
    for name, lr in (("rlkd-a", 3e-3), ("rlkd-b", 1e-2)):
        cfg = TrainConfig(
            cache=str(caches["train"]),
            student=str(student),
            output=str(base / name),
            lr=lr,
            max_steps=3,
            batch_tokens=512,
            save_every=10,
        )
        train(cfg, progress=False)
        out[name] = base / name
    return out


def rlkd(*args: str | Path) -> Result:
    return CliRunner().invoke(app, ["eval", *map(str, args), "--no-progress"])


def test_json_has_every_metric_and_the_paths(runs, caches):
    result = rlkd("--student", runs["rlkd-a"], "--cache", caches["eval"], "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    keys = [f"overlap@{k}" for k in OVERLAP_KS] + [f"consistency@{k}" for k in CONSISTENCY_KS]
    for key in [*keys, "spearman", "kendall", "kl", "ce", "ppl", "positions"]:
        assert key in out, key
    assert out["student"] == str(runs["rlkd-a"] / "final")  # a run folder means its final/
    assert out["cache"] == str(caches["eval"])
    assert out["positions"] == Cache(caches["eval"]).manifest["totals"]["positions"]
    assert out["overlap@20_capped_to"] == 16  # the cache's k
    assert 0 < out["overlap@1"] <= out["overlap@20"] <= 1
    assert out["kl"] > 0 and out["ppl"] > 1


def test_top1_agreement_equals_a_direct_full_forward(runs, caches, tmp_path):
    """overlap@1 = consistency@1 = the fraction of positions where the argmax of a plain full
    forward of the student is the cache's top-1, exactly (small batches and chunks, so the
    chunked path crosses batch and chunk boundaries)."""
    from transformers import AutoModelForCausalLM

    result = rlkd(
        "--student", runs["rlkd-a"], "--cache", caches["eval"], "--json",
        "--batch-tokens", "200", "--chunk-size", "7", "--recompute", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(runs["rlkd-a"] / "final").eval()
    hits = positions = 0
    with torch.no_grad():
        for row in Cache(caches["eval"]).rows():
            input_ids = torch.tensor(row.input_ids, dtype=torch.long)[None]  # (1, T)
            logits = model(input_ids).logits[0]  # (T, V)
            top1 = logits[torch.tensor(row.positions, dtype=torch.long)].argmax(-1)  # (P,)
            hits += int((top1 == torch.tensor(row.topk_ids[:, 0], dtype=torch.long)).sum())
            positions += len(row.positions)
    assert out["positions"] == positions
    assert 0 < hits < positions
    assert out["overlap@1"] == out["consistency@1"] == hits / positions


def test_the_table_is_aligned_and_marks_capped_metrics(runs, caches):
    result = rlkd("--student", runs["rlkd-a"], "--cache", caches["eval"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"student  {runs['rlkd-a'] / 'final'}"
    assert lines[1] == f"cache    {caches['eval']}"
    assert lines[2].split() == ["metric", "value"]
    table = {line.split()[0]: line.split()[1] for line in lines[3:-1]}
    assert table["overlap@20"].endswith("*") and not table["overlap@10"].endswith("*")
    assert {"overlap@1", "consistency@5", "spearman", "kendall", "kl", "ppl"} <= set(table)
    assert lines[-1].startswith("* computed at k=16")
    assert len({len(line) for line in lines[2:-1]}) == 1  # right-aligned column


def test_generate_from_a_jsonl_file(tiny_teacher, caches, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:3]))
    result = rlkd(
        "--student", tiny_teacher, "--cache", caches["eval"], "--json",
        "--generate", prompts, "--limit", "2", "--max-new-tokens", "8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["generations"] == 2
    assert 0 <= out["rouge_l"] <= 1
    table = rlkd(
        "--student", tiny_teacher, "--cache", caches["eval"],
        "--generate", prompts, "--limit", "1", "--max-new-tokens", "4",
    )  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "rouge_l" in table.stdout and "generations" in table.stdout


def test_the_teacher_reproduces_its_own_greedy_generations(tiny_teacher, caches):
    """Same model, same greedy decoding, same token budget (the teacher's, taken from the cache
    by default), batched with left padding as the teacher was: ROUGE-L is exactly 1."""
    result = rlkd("--student", tiny_teacher, "--cache", caches["teacher"], "--generate", "cache")
    assert result.exit_code == 0, result.output
    result = rlkd(
        "--student", tiny_teacher, "--cache", caches["teacher"], "--generate", "cache", "--json"
    )
    out = json.loads(result.stdout)
    assert out["generations"] == 6
    assert out["rouge_l"] == 1.0


def test_compare_puts_runs_side_by_side_and_writes_a_png(runs, caches, tmp_path):
    plot = tmp_path / "plots" / "cmp.png"
    args = ["--compare", runs["rlkd-a"], runs["rlkd-b"], "--cache", caches["eval"]]
    result = rlkd(*args, "--plot", plot)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == PNG_MAGIC
    header = result.stdout.splitlines()[1].split()
    assert header == ["metric", "rlkd-a", "rlkd-b"]
    assert result.stdout.splitlines()[-1] == f"plot: {plot}"
    out = json.loads(rlkd(*args, "--plot", plot, "--json").stdout)
    assert [r["label"] for r in out["runs"]] == ["rlkd-a", "rlkd-b"]
    assert out["runs"][0]["overlap@5"] != out["runs"][1]["overlap@5"]


def test_compare_defaults_to_compare_png_in_the_current_dir(runs, caches, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = rlkd("--compare", runs["rlkd-a"], "--cache", caches["eval"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert result.stdout.splitlines()[-1] == "plot: compare.png"


def test_a_saved_result_is_reused_only_for_the_same_cache_and_student(runs, caches, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["rlkd-a"], run)
    (run / RESULTS).unlink(missing_ok=True)  # saved by other tests
    fresh = json.loads(rlkd("--student", run, "--cache", caches["eval"], "--json").stdout)
    saved = json.loads((run / RESULTS).read_text())
    fingerprint = Cache(caches["eval"]).manifest["fingerprint"]
    assert list(saved) == [fingerprint]
    saved[fingerprint]["metrics"]["kl"] = 123.0  # a marker: reused results carry it
    (run / RESULTS).write_text(json.dumps(saved))
    reused = json.loads(rlkd("--student", run, "--cache", caches["eval"], "--json").stdout)
    assert reused["kl"] == 123.0
    again = rlkd("--student", run, "--cache", caches["eval"], "--json", "--recompute")
    assert json.loads(again.stdout)["kl"] == fresh["kl"]
    (run / RESULTS).write_text(json.dumps(saved))
    (run / "final" / "generation_config.json").write_text("{}")  # another student folder
    changed = json.loads(rlkd("--student", run, "--cache", caches["eval"], "--json").stdout)
    assert changed["kl"] == fresh["kl"]


def test_errors_are_one_line(runs, caches, tiny_teacher, tmp_path):
    def error(*args: str | Path) -> str:
        result = rlkd(*args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()  # model loading may log progress first
        assert [line for line in lines if "error" in line] == lines[-1:], result.stderr
        assert lines[-1].startswith("rlkd: error: ")
        return lines[-1]

    assert "student not found" in error("--student", tmp_path / "nope", "--cache", caches["eval"])
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    assert "without a final/ student" in error("--student", unfinished, "--cache", caches["eval"])
    assert "has no responses.parquet" in error(
        "--student", tiny_teacher, "--cache", caches["eval"], "--generate", "cache"
    )
    assert "no such file" in error(
        "--student", tiny_teacher, "--cache", caches["eval"], "--generate", tmp_path / "x.jsonl"
    )
    assert "cache not found" in error("--student", tiny_teacher, "--cache", tmp_path / "none")
    other = build_llama(tmp_path / "other", build_tokenizer(vocab_size=300), layers=1)
    assert "differs from the eval cache" in error("--student", other, "--cache", caches["eval"])
