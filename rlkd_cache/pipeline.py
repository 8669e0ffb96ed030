"""`rlkd run RECIPE.yaml`: a whole distillation experiment from one file.

A recipe names the teacher and data once (`cache:`, with a training and a held-out split),
how the student starts (`student:` layers taken from the teacher, or a folder), the training
settings shared by every run (`train:`), the arms that differ (`arms:` name -> train
overrides) and the seeds. The runner caches both splits (reused when already cached), builds
the student, trains every arm x seed (a finished run is reused), evaluates each run and the
starting student on the held-out cache, and prints a table (mean ± std over seeds when there
are several). Everything lands under `output:`; `results.json` holds every number.

`budgets: [30, 80]` evaluates every run after 30 and after 80 optimizer steps, as rows
`arm@30` and `arm@80`: the run trains to 30, is evaluated, and continues to 80 from its own
checkpoint. That is one run seen at two lengths, so it needs `train.schedule: constant` (with
a decaying schedule the first 30 steps of an 80-step run are not a 30-step run).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from rlkd_cache.cache import resolve_model, run_cache
from rlkd_cache.config import CacheConfig, EvalConfig, TrainConfig, build_config, read_yaml
from rlkd_cache.errors import RlkdError
from rlkd_cache.eval.compare import plot, render_table
from rlkd_cache.eval.run import run_eval
from rlkd_cache.store.atomic import write_json_atomic
from rlkd_cache.train.checkpoint import checkpoints
from rlkd_cache.train.loop import train
from rlkd_cache.train.run_dir import config_differences
from rlkd_cache.train.student_init import random_student, shallow_student

log = logging.getLogger("rlkd.pipeline")

REPORTED = (
    "overlap@1",
    "overlap@5",
    "overlap@20",
    "consistency@2",
    "consistency@3",
    "spearman",
    "kendall",
    "kl",
    "ppl",
    "rouge_l",
)
"""Metrics in the summary table (every metric is in results.json)."""


@dataclass
class Recipe:
    """A parsed recipe file (see the module docstring and pipelines/*.yaml)."""

    output: str
    cache: dict[str, Any]
    splits: dict[str, str]
    student: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {"rlkd": {}})
    seeds: list[int] = field(default_factory=lambda: [0])
    eval: dict[str, Any] = field(default_factory=dict)
    name: str = "experiment"
    budgets: list[int] = field(default_factory=list)
    baseline: str | None = None


def set_key(tree: dict[str, Any], dotted: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested mapping."""
    if "=" not in dotted:
        raise RlkdError(f"--set {dotted!r}: expected KEY=VALUE, for example train.max_steps=10")
    key, raw = dotted.split("=", 1)
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RlkdError(f"--set {dotted!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def load_recipe(path: str | Path, sets: Sequence[str] = ()) -> Recipe:
    """Read a recipe, apply `--set` overrides, and check every key against the stage configs."""
    tree = read_yaml(path, "recipe")
    for dotted in sets:
        set_key(tree, dotted)
    try:
        recipe = Recipe(**tree)
    except TypeError as e:
        raise RlkdError(
            f"{path}: {e} (expected keys: {sorted(Recipe.__dataclass_fields__)})"
        ) from None
    if set(recipe.splits) != {"train", "eval"}:
        raise RlkdError(
            f"{path}: splits must name exactly `train` and `eval`, got {sorted(recipe.splits)}"
        )
    build_config(CacheConfig, recipe.cache, f"{path}: cache")
    check_budgets(recipe, path)
    if recipe.baseline is not None and recipe.baseline not in recipe.arms:
        raise RlkdError(f"{path}: baseline {recipe.baseline!r} is not an arm {list(recipe.arms)}")
    for arm in recipe.arms:
        if not isinstance(arm, str) or "/" in arm:
            raise RlkdError(f"{path}: arm names must be plain names, got {arm!r}")
        for seed in recipe.seeds:
            arm_config(recipe, arm, seed, RUN_PATHS, path)
    eval_config(recipe, path)
    return recipe


RUN_PATHS = {"cache": "-", "eval_cache": "-", "student": "-", "output": "-"}
"""Stand-ins for the paths `run_recipe` fills in, so `load_recipe` can check the rest."""


def check_budgets(recipe: Recipe, path: str | Path) -> None:
    """`budgets:` must be ascending positive step counts over a constant schedule."""
    budgets = recipe.budgets
    if not budgets:
        return
    if not all(isinstance(b, int) and b > 0 for b in budgets) or budgets != sorted(set(budgets)):
        raise RlkdError(f"{path}: budgets must be ascending step counts > 0, got {budgets}")
    if recipe.train.get("schedule") != "constant":
        raise RlkdError(
            f"{path}: budgets {budgets} need train.schedule: constant (with a decaying "
            "schedule a run's first steps are not a shorter run)"
        )


def arm_config(
    recipe: Recipe,
    arm: str,
    seed: int,
    paths: dict[str, str],
    path: str | Path,
    budget: int | None = None,
) -> TrainConfig:
    """The train config of one run: the recipe's `train:`, the arm's overrides, the seed and
    the run's paths (caches, student, output); `budget` replaces `max_steps`."""
    steps = {} if budget is None else {"max_steps": budget}
    keys = {**recipe.train, **(recipe.arms[arm] or {}), "seed": seed, **paths, **steps}
    return build_config(TrainConfig, keys, f"{path}: train/arm {arm}")


def eval_config(recipe: Recipe, path: str | Path) -> EvalConfig:
    """How every run (and the starting student) is evaluated: the recipe's `eval:`."""
    return build_config(EvalConfig, recipe.eval, f"{path}: eval")


def build_student(recipe: Recipe, teacher: Path, out: Path) -> Path:
    """The starting student: a folder (`student.path`), a random init (`student.random`:
    layers, hidden, heads, seed), or the teacher's own layers (`student.layers`)."""
    if "path" in recipe.student:
        return Path(recipe.student["path"])
    if not (teacher / "config.json").is_file():  # a served teacher's tokenizer folder
        raise RlkdError(
            "the recipe's student, built from the teacher, needs the teacher's config (and for "
            f"layers, its weights), which {teacher} does not hold: give student: path: FOLDER"
        )
    if "random" in recipe.student:  # {layers: N, hidden: H, heads: A, seed: S}
        shape = dict(recipe.student["random"])
        folder = (
            out / "students" / ("random-" + "-".join(f"{k}{v}" for k, v in sorted(shape.items())))
        )
        if (folder / "config.json").is_file():
            return folder
        return random_student(teacher, folder, **shape)
    layers = [int(i) for i in recipe.student.get("layers", [])]
    folder = out / "students" / ("layers-" + "-".join(map(str, layers)))
    if (folder / "config.json").is_file():
        log.info("reusing the student %s", folder)
        return folder
    log.info("building the student from teacher layers %s", layers)
    return shallow_student(teacher, layers, folder)


def finished(cfg: TrainConfig) -> bool:
    """A run folder that already holds this run's final student: same settings, and its
    `final/` saved after its newest checkpoint, which is at `max_steps` (a run continued to a
    longer budget rewrites its config.json first and its `final/` last)."""
    run = Path(cfg.output)
    last = "merged/config.json" if cfg.merge else "adapter_config.json"  # a LoRA run's, last
    final = run / "final" / (last if cfg.lora_r else "config.json")
    if not final.is_file() or not (run / "config.json").is_file():
        return False
    saved = json.loads((run / "config.json").read_text())
    if config_differences(saved, cfg) or (saved.get("max_steps"), saved.get("epochs")) != (
        cfg.max_steps,
        cfg.epochs,
    ):
        return False
    done = checkpoints(run)
    if not done:
        return False
    newest = done[-1]
    at_end = cfg.max_steps is None or int(newest.name.removeprefix("step-")) == cfg.max_steps
    return at_end and final.stat().st_mtime_ns >= (newest / "trainer.json").stat().st_mtime_ns


def train_and_evaluate(
    cfg: TrainConfig,
    eval_cache: Path | str,
    evaluation: EvalConfig,
    budget: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Train one run (unless already trained) and evaluate it. With a `budget`, the result is
    kept in the run folder as `budget-N.json`, since the run then trains on past N."""
    run_dir = Path(cfg.output)
    kept = run_dir / f"budget-{budget}.json"
    if budget is not None and kept.is_file():
        return json.loads(kept.read_text())
    if finished(cfg):
        log.info("already trained: %s", run_dir)
    else:
        done = [int(p.name.removeprefix("step-")) for p in checkpoints(run_dir)]
        if budget is not None and done and max(done) > budget:
            raise RlkdError(
                f"{run_dir} trained past {budget} steps before its budget-{budget} result "
                "was kept; delete the run folder to train it again"
            )
        log.info("training %s to %d steps", run_dir.name, cfg.max_steps)
        train(cfg, progress=progress)
    result = run_eval(run_dir, eval_cache, evaluation, progress)
    if budget is not None:
        write_json_atomic(kept, result)
    return result


def summarize(results: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: one row per arm, mean ± std over seeds for each reported metric."""
    names = [m for m in REPORTED if any(m in r for runs in results.values() for r in runs)]
    lines = ["| arm | seeds | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for arm, runs in results.items():
        cells = []
        for name in names:
            values = [r[name] for r in runs if name in r]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


COMPARED = ("overlap@1", "consistency@2", "overlap@5", "overlap@20", "kl", "ppl")
"""Metrics of the table of differences against the baseline arm."""


def differences(
    results: dict[str, list[dict[str, Any]]], baseline: str, metrics: Sequence[str] = COMPARED
) -> str:
    """Markdown table: each arm minus the baseline arm (`arm@N` against `baseline@N`), per
    metric: the mean over seeds of the per-seed differences (same seed = same data order),
    that mean over the pooled seed sd sqrt((sd_arm^2 + sd_base^2) / 2), and on how many seeds
    the difference has the sign of the mean. Needs two or more seeds in both arms."""
    lines = [
        "| arm | " + " | ".join(metrics) + " |",
        "|---" * (len(metrics) + 1) + "|",
    ]
    for label, runs in results.items():
        arm, _, budget = label.partition("@")
        base_label = f"{baseline}@{budget}" if budget else baseline
        if arm in ("start", baseline) or base_label not in results:
            continue
        base = {r["seed"]: r for r in results[base_label]}
        pairs = [(r, base[r["seed"]]) for r in runs if r["seed"] in base]
        cells = []
        for name in metrics:
            diffs = [a[name] - b[name] for a, b in pairs]
            if len(diffs) < 2:
                cells.append("-")
                continue
            mean = statistics.mean(diffs)
            pooled = math.sqrt(
                (
                    statistics.variance([a[name] for a, _ in pairs])
                    + statistics.variance([b[name] for _, b in pairs])
                )
                / 2
            )
            agree = sum((d > 0) == (mean > 0) and d != 0 for d in diffs)
            ratio = f"{mean / pooled:+.1f} sd" if pooled > 0 else "sd 0"
            digits = 2 if name == "ppl" else 4
            cells.append(f"{mean:+.{digits}f} ({ratio}, {agree}/{len(diffs)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_recipe(path: str | Path, sets: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Run a recipe end to end; return (and save as results.json) every number."""
    recipe = load_recipe(path, sets)
    out = Path(recipe.output)
    out.mkdir(parents=True, exist_ok=True)
    common = build_config(CacheConfig, recipe.cache, f"{path}: cache")
    teacher = resolve_model(common)
    caches = {}
    for split_name, split in recipe.splits.items():
        log.info("caching the %s split (%s)", split_name, split)
        caches[split_name] = run_cache(replace(common, split=split), progress=progress)
    student = build_student(recipe, teacher, out)
    evaluation = eval_config(recipe, path)
    baseline = run_eval(student, caches["eval"], evaluation, progress)
    results: dict[str, list[dict[str, Any]]] = {"start": [baseline]}
    budgets: list[int | None] = list(recipe.budgets) or [None]
    for arm in recipe.arms:
        for budget in budgets:
            results[arm if budget is None else f"{arm}@{budget}"] = []
        for seed in recipe.seeds:
            run_dir = out / "runs" / f"{arm}-seed{seed}"
            paths = {
                "cache": str(caches["train"]),
                "eval_cache": str(caches["eval"]),
                "student": str(student),
                "output": str(run_dir),
            }
            for budget in budgets:
                cfg = arm_config(recipe, arm, seed, paths, path, budget)
                result = train_and_evaluate(cfg, caches["eval"], evaluation, budget, progress)
                label = arm if budget is None else f"{arm}@{budget}"
                results[label].append({**result, "seed": seed})
    firsts = [runs[0] for runs in results.values()]
    table = render_table(firsts, list(results))
    if len(recipe.seeds) > 1:
        table += "\n\nmean ± std over seeds " + str(recipe.seeds) + ":\n" + summarize(results)
        if recipe.baseline is not None:
            table += f"\n\nminus {recipe.baseline}, per seed:\n" + differences(
                results, recipe.baseline
            )
    picture = plot(firsts, list(results), out / "compare.png")
    summary = {
        "recipe": str(path),
        "caches": {k: str(v) for k, v in caches.items()},
        "student": str(student),
        "results": results,
        "table": table,
        "plot": str(picture),
    }
    write_json_atomic(out / "results.json", summary)
    return summary
