"""Recipes: every pipelines/*.yaml loads; the demo recipe runs end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from rlkd_cache.errors import RlkdError
from rlkd_cache.losses.chunked import PRESETS
from rlkd_cache.pipeline import load_recipe, run_recipe

RECIPES = sorted((REPO / "pipelines").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "ablation.yaml"} <= names and any("gpu" in n for n in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe: Path):
    loaded = load_recipe(recipe)
    assert loaded.arms and loaded.seeds and set(loaded.splits) == {"train", "eval"}


def test_ablation_has_the_arms_the_issue_asks_for():
    recipe = load_recipe(REPO / "pipelines" / "ablation.yaml")
    assert len(recipe.seeds) >= 3
    arms = recipe.arms
    assert (
        arms["sft"]["kd_weight"] == 0
        and arms["sft"]["rank_weight"] == 0
        and arms["sft"]["ce_weight"] > 0
    )
    assert arms["fkl"]["rank_weight"] == 0 and arms["fkl_renorm"]["tail"] == "renormalize"
    assert arms["rlkd"] == {"preset": "authors"} and arms["rkl_rank"]["kd"] == "rkl"


def test_rank_ablations_separate_the_causes():
    for name in ("rank-chat.yaml", "rank-plain.yaml"):
        recipe = load_recipe(REPO / "pipelines" / name)
        assert len(recipe.seeds) >= 3 and len(recipe.budgets) == 2 and recipe.baseline == "fkl"
        arms = recipe.arms
        assert arms["fkl"]["rank_weight"] == 0 and arms["authors"] == {"preset": "authors"}
        loss = [{**PRESETS.get(v.get("preset", "none"), {}), **v} for v in arms.values()]
        relative = {v["rank_weight"] / v["kd_weight"] for v in loss if "kd_weight" in v}
        assert len({r for r in relative if r > 0}) >= 2  # the rank term's weight varies


def test_bad_keys_are_named(tmp_path):
    with pytest.raises(RlkdError, match="unknown key 'top_kk'"):
        load_recipe(REPO / "pipelines" / "demo.yaml", ["cache.top_kk=3"])
    with pytest.raises(RlkdError, match="unknown key 'lrr'"):
        load_recipe(REPO / "pipelines" / "demo.yaml", ["train.lrr=3"])


def smoke_sets(teacher: Path, tmp_path: Path, *more: str) -> list[str]:
    """The demo recipe shrunk to tiny models and a few rows and steps, and `more` settings."""
    return [
        f"cache.model={teacher}",
        f"cache.cache_root={tmp_path / 'caches'}",
        f"output={tmp_path / 'out'}",
        "student.layers=[0]",
        "train.max_steps=4",
        "cache.gen_max_new_tokens=8",
        "splits.train=train[:12]",
        "splits.eval=train[300:306]",
        "eval.limit=4",
        *more,
    ]


@pytest.mark.slow
def test_demo_recipe_smoke_run(tiny_teacher, tmp_path):
    sets = smoke_sets(tiny_teacher, tmp_path)
    summary = run_recipe(REPO / "pipelines" / "demo.yaml", sets, progress=False)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == {"start", "rlkd"}
    for result in (saved["results"]["start"][0], saved["results"]["rlkd"][0]):
        assert {"overlap@5", "consistency@3", "spearman", "kendall", "kl", "ppl", "rouge_l"} <= set(
            result
        )
        assert result["generations"] == 4
    for cache in saved["caches"].values():
        assert (Path(cache) / "manifest.json").is_file() and (
            Path(cache) / "responses.parquet"
        ).is_file()
    assert (out / "students" / "layers-0" / "config.json").is_file()
    assert (out / "runs" / "rlkd-seed0" / "final" / "model.safetensors").is_file()
    assert (out / "runs" / "rlkd-seed0" / "metrics.jsonl").is_file()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overlap@5" in summary["table"] and "start" in summary["table"]
    # rerunning reuses everything: no cache, student or run is rebuilt
    final = out / "runs" / "rlkd-seed0" / "final" / "model.safetensors"
    mtimes = [
        final.stat().st_mtime_ns,
        (out / "students" / "layers-0" / "config.json").stat().st_mtime_ns,
    ]
    run_recipe(REPO / "pipelines" / "demo.yaml", sets, progress=False)
    assert [
        final.stat().st_mtime_ns,
        (out / "students" / "layers-0" / "config.json").stat().st_mtime_ns,
    ] == mtimes


@pytest.mark.slow
def test_a_lora_recipe_trains_evaluates_its_adapter_and_is_reused(tiny_teacher, tmp_path):
    sets = smoke_sets(tiny_teacher, tmp_path, "train.lr=1e-2", "train.lora_r=8")
    run_recipe(REPO / "pipelines" / "demo.yaml", sets, progress=False)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())["results"]
    start, lora = results["start"][0], results["rlkd"][0]
    assert lora["generations"] == 4 and lora["kl"] != start["kl"]  # the adapter, evaluated
    adapter = out / "runs" / "rlkd-seed0" / "final" / "adapter_model.safetensors"
    assert adapter.is_file() and not (adapter.parent / "model.safetensors").exists()
    mtime = adapter.stat().st_mtime_ns
    run_recipe(REPO / "pipelines" / "demo.yaml", sets, progress=False)
    assert adapter.stat().st_mtime_ns == mtime  # the finished LoRA run was reused


def test_recipe_student_can_be_random(tiny_teacher, tmp_path):
    from transformers import AutoConfig

    from rlkd_cache.pipeline import build_student

    recipe = load_recipe(
        REPO / "pipelines" / "demo.yaml", ["student={random: {layers: 1, hidden: 64, heads: 1}}"]
    )
    folder = build_student(recipe, tiny_teacher, tmp_path)
    config = AutoConfig.from_pretrained(folder)
    assert config.num_hidden_layers == 1 and config.hidden_size == 64
    assert build_student(recipe, tiny_teacher, tmp_path) == folder  # reused


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_budgets_evaluate_one_run_at_two_lengths(tiny_teacher, tmp_path):
    import torch

    base = [
        f"cache.model={tiny_teacher}",
        f"cache.cache_root={tmp_path / 'caches'}",
        "cache.gen_max_new_tokens=8",
        "student.layers=[0]",
        "splits.train=train[:12]",
        "splits.eval=train[300:306]",
        "train.schedule=constant",
        "train.batch_tokens=256",
        "eval.generate=null",
        "arms={rlkd: {}}",
    ]
    budgeted = run_recipe(
        REPO / "pipelines" / "demo.yaml",
        [*base, f"output={tmp_path / 'b'}", "budgets=[2, 5]"],
        progress=False,
    )
    assert set(budgeted["results"]) == {"start", "rlkd@2", "rlkd@5"}
    short, long = budgeted["results"]["rlkd@2"][0], budgeted["results"]["rlkd@5"][0]
    assert short["kl"] != long["kl"]
    run = tmp_path / "b" / "runs" / "rlkd-seed0"
    assert json.loads((run / "budget-2.json").read_text())["kl"] == short["kl"]
    # the 5-step student equals a 5-step run trained straight through
    straight = run_recipe(
        REPO / "pipelines" / "demo.yaml",
        [*base, f"output={tmp_path / 's'}", "train.max_steps=5"],
        progress=False,
    )
    assert straight["results"]["rlkd"][0]["kl"] == long["kl"]
    a = _weights(run / "final" / "model.safetensors")
    b = _weights(tmp_path / "s" / "runs" / "rlkd-seed0" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # rerunning reuses the kept results; nothing trains again
    again = run_recipe(
        REPO / "pipelines" / "demo.yaml",
        [*base, f"output={tmp_path / 'b'}", "budgets=[2, 5]"],
        progress=False,
    )
    assert again["results"]["rlkd@2"][0]["kl"] == short["kl"]
    # a continuation killed after it rewrote config.json (max_steps 8) but before final/: the
    # old final/ is not taken for the 8-step student
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "max_steps": 8}))
    longer = run_recipe(
        REPO / "pipelines" / "demo.yaml",
        [*base, f"output={tmp_path / 'b'}", "budgets=[2, 5, 8]"],
        progress=False,
    )
    assert longer["results"]["rlkd@8"][0]["kl"] != long["kl"]
    assert (run / "checkpoints" / "step-00000008").is_dir()


def test_budgets_need_a_constant_schedule():
    with pytest.raises(RlkdError, match=r"budgets \[10, 20\] need train.schedule: constant"):
        load_recipe(REPO / "pipelines" / "demo.yaml", ["budgets=[10, 20]"])
    with pytest.raises(RlkdError, match="ascending"):
        load_recipe(
            REPO / "pipelines" / "demo.yaml", ["budgets=[20, 10]", "train.schedule=constant"]
        )
