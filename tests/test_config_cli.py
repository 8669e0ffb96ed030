"""One source for every option: each config field is a flag of its command, `--help` shows the
field's docstring and its default as the dataclass holds it, and every bad value is a one-line
error naming the flag or the YAML key, before any work starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from conftest import REPO
from rlkd_cache.config import CacheConfig, EvalConfig, TrainConfig, build_config, load_config
from rlkd_cache.errors import RlkdError
from rlkd_cache.losses import LossConfig
from rlkd_cache.plan import POSITIONS_PER_SHARD
from rlkd_cli.main import app
from rlkd_cli.options import field_docs

COMMANDS = {
    "cache": (CacheConfig, {"config_path", "no_progress"}),
    "train": (TrainConfig, {"config_path", "no_progress", "plan", "gpu_memory"}),
    "eval": (
        EvalConfig,
        {"runs", "student", "cache_dir", "compare", "plot_path", "as_json", "no_progress"},
    ),
}
"""Command -> (its config, the parameters that are the CLI's own, not config fields)."""

FACTORY_DEFAULTS = {
    "cache_root": "$RLKD_CACHE_ROOT, else ~/.cache/rlkd",
    "vllm_engine_kwargs": "{}",
    "storage_options": "{}",
}
"""What `--help` shows for fields whose default comes from a factory."""

TRAIN = ["train", "--cache", "no-cache", "--student", "no-student", "--output"]
"""`rlkd train` with every required flag (the output folder follows)."""


def squash(text: str) -> str:
    """`text` without whitespace: click wraps help lines, at spaces and after hyphens."""
    return "".join(text.split())


def one_line_error(*args: str) -> str:
    """Run `rlkd ARGS`, check it fails with exit 1 and one `rlkd: error:` line; the message."""
    result: Result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlkd: error: "), result.stderr
    return lines[0].removeprefix("rlkd: error: ")


@pytest.mark.parametrize("name", COMMANDS)
def test_every_field_is_a_flag_and_every_flag_a_field(name: str):
    cls, cli_only = COMMANDS[name]
    command = app.commands[name]
    params = {p.name: p for p in command.params if p.name not in cli_only}
    assert set(params) == {f.name for f in dataclasses.fields(cls)}
    for field_name, param in params.items():
        assert isinstance(param, click.Option)
        assert param.opts[0] == "--" + field_name.replace("_", "-")
        assert param.default is None  # not given: the YAML file's key or the field's default


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_each_docstring_and_default_as_the_dataclass_holds_it(name: str):
    cls, _ = COMMANDS[name]
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    text = squash(result.output)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("required"):
            shown = "[required]"
        elif f.default_factory is not dataclasses.MISSING:
            shown = f"[default: {FACTORY_DEFAULTS[f.name]}]"
        else:
            shown = f"[default: {f.default}]"
        assert squash(f"{docs[f.name]} {shown}") in text, f.name


@pytest.mark.parametrize("cls", [CacheConfig, TrainConfig, EvalConfig, LossConfig])
def test_every_field_has_a_docstring(cls: type):
    docs = field_docs(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= {k for k, v in docs.items() if v}


def test_field_docs_come_from_the_class_and_its_bases():
    train = field_docs(TrainConfig)
    assert train["jsd_beta"] == "Mixture weight of the teacher in the generalized JSD, in (0, 1)."
    assert train["max_steps"] == "Optimizer steps to run; None: `epochs` passes."
    assert field_docs(CacheConfig)["id_field"] == (
        "Column with a stable sequence id. None: the row index within the split."
    )


def test_the_shard_size_in_the_docs_is_the_code_s():
    assert (
        f"{POSITIONS_PER_SHARD:,} positions per shard" in field_docs(CacheConfig)["num_shards_hint"]
    )


def test_train_config_has_each_loss_field_once_with_the_loss_default():
    loss = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    train = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert loss.items() <= train.items()
    assert {"jsd_beta", "skew_alpha", "akl_mu", "rank_strength"} <= set(loss)


def test_every_loss_field_is_a_yaml_key_and_a_flag(tmp_path: Path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "cache: c\nstudent: s\noutput: o\njsd_beta: 0.3\nskew_alpha: 0.2\nakl_mu: 0.4\n"
        "rank_strength: 2.0\nkd: js\n"
    )
    cfg = load_config(TrainConfig, str(config), akl_mu=0.6, rank_k=None)
    assert (cfg.jsd_beta, cfg.skew_alpha, cfg.akl_mu, cfg.rank_strength) == (0.3, 0.2, 0.6, 2.0)
    assert cfg.kd == "js" and cfg.rank_k == 15  # a None flag is "not given"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
        (["--eval-every", "0"], "--eval-every must be >= 1, got 0"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--save-every", "0"], "--save-every must be >= 1, got 0"),
        (["--device", "nonsense"], "--device must be auto or a torch device"),
        (["--rank-k", "0"], "--rank-k must be >= 2, got 0"),
        (["--max-steps", "0"], "--max-steps must be None or >= 1, got 0"),
        (["--max-steps", "-2"], "--max-steps must be None or >= 1, got -2"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
        (["--batch-tokens", "1"], "--batch-tokens must be >= 2, got 1"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--jsd-beta", "1"], "--jsd-beta must be in (0, 1), got 1.0"),
        (["--kd-weight", "-1"], "--kd-weight must be finite and >= 0, got -1.0"),
    ],
)
def test_bad_train_flags_are_one_line_errors(tmp_path: Path, flags: list[str], message: str):
    assert one_line_error(*TRAIN, str(tmp_path / "run"), *flags).startswith(message)
    assert not (tmp_path / "run").exists()


def test_required_train_flags_and_yaml_keys_are_named(tmp_path: Path):
    assert one_line_error("train", "--cache", "c", "--student", "s") == "--output is required"
    config = tmp_path / "train.yaml"
    config.write_text("cache: c\nstudent: s\noutput: o\ntemperature: 0\n")
    message = one_line_error("train", "--config", str(config))
    assert message == f"{config}: temperature must be > 0, got 0.0"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--logprob-step", "2"], "--logprob-step must be in (0, 1] nats, got 2.0"),
        (["--max-length", "1"], "--max-length must be >= 2 tokens, got 1"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0"),
        (["--batch-tokens", "0"], "--batch-tokens must be >= 1, got 0"),
        (["--num-shards-hint", "0"], "--num-shards-hint must be None or >= 1, got 0"),
    ],
)
def test_bad_cache_flags_fail_before_the_teacher_loads(
    tmp_path: Path, flags: list[str], message: str
):
    root = tmp_path / "caches"
    args = ["cache", "--model", str(tmp_path / "no-model"), "--cache-root", str(root), *flags]
    assert one_line_error(*args) == message  # not "model not found": checked before
    assert not root.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
        (["--limit", "0"], "--limit must be None or >= 1, got 0"),
        (["--device", "nonsense"], "--device must be auto or a torch device"),
    ],
)
def test_bad_eval_flags_are_one_line_errors(tmp_path: Path, flags: list[str], message: str):
    args = ["eval", "--student", str(tmp_path), "--cache", str(tmp_path / "none"), *flags]
    assert one_line_error(*args).startswith(message)  # not "cache not found": checked first


def test_a_json_flag_takes_an_object():
    result = CliRunner().invoke(app, ["cache", "--vllm-engine-kwargs", "[1]"])
    assert result.exit_code == 2 and "expected a JSON object" in result.stderr


def test_a_recipe_with_a_bad_loss_setting_fails_before_any_cache(tiny_teacher, tmp_path: Path):
    recipe = REPO / "pipelines" / "demo.yaml"
    sets = [f"cache.model={tiny_teacher}", f"cache.cache_root={tmp_path / 'caches'}"]
    sets += [f"output={tmp_path / 'out'}", "arms.rlkd.temperature=0"]
    message = one_line_error("run", str(recipe), *(a for s in sets for a in ("--set", s)))
    assert message == f"{recipe}: train/arm rlkd: temperature must be > 0, got 0.0"
    assert not (tmp_path / "caches").exists() and not (tmp_path / "out").exists()


def test_recipe_sections_are_checked_like_flags():
    with pytest.raises(RlkdError, match=r"r\.yaml: eval: limit must be None or >= 1, got 0"):
        build_config(EvalConfig, {"limit": 0}, "r.yaml: eval")
    with pytest.raises(RlkdError, match=r"r\.yaml: cache: top_k must be int, got 'many'"):
        build_config(CacheConfig, {"top_k": "many"}, "r.yaml: cache")
