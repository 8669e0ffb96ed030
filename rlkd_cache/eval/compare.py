"""Readable output of `rlkd eval`: the metrics table (one column per student) and the PNG plot
of overlap@k and consistency@k per run that `rlkd eval --compare` writes.

Runs are labelled by their folder name (the run folder's, not `final`); labels that would
repeat fall back to the paths as given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlkd_cache.config import EvalConfig
from rlkd_cache.eval.metrics import CONSISTENCY_KS, OVERLAP_KS
from rlkd_cache.eval.run import run_eval
from rlkd_cache.store.atomic import atomic_path

ROWS: tuple[str, ...] = (
    *(f"overlap@{k}" for k in OVERLAP_KS),
    *(f"consistency@{k}" for k in CONSISTENCY_KS),
    "spearman",
    "kendall",
    "kl",
    "ce",
    "ppl",
    "rouge_l",
    "generations",
    "positions",
)
"""Table rows, in order; a row no result has is left out."""


def labels_for(paths: Sequence[str]) -> list[str]:
    """Short, distinct labels: the folder name (the run's for `RUN/final`), else the path."""
    names = []
    for given in paths:
        path = Path(given.rstrip("/") or given)
        names.append(path.parent.name if path.name == "final" else path.name)
    if len(set(names)) < len(names):
        return [str(p) for p in paths]
    return names


def _cell(result: dict[str, Any], name: str) -> str:
    """One value: ints as they are, floats to 4 places, starred when computed at a capped k."""
    if name not in result:
        return "-"
    value = result[name]
    text = str(value) if isinstance(value, int) else f"{value:.4f}"
    return text + ("*" if f"{name}_capped_to" in result else "")


def render_table(results: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Rows = metrics, columns = students; a metric computed at a capped k is starred, with a
    note naming the k used."""
    rows = [name for name in ROWS if any(name in r for r in results)]
    grid = [[_cell(r, name) for r in results] for name in rows]  # (metrics, students)
    width = max(len(name) for name in [*rows, "metric"])
    columns = [max(len(label), *(len(line[j]) for line in grid)) for j, label in enumerate(labels)]
    header = [label.rjust(w) for label, w in zip(labels, columns, strict=True)]
    lines = ["  ".join(["metric".ljust(width), *header])]
    for name, line in zip(rows, grid, strict=True):
        values = [cell.rjust(w) for cell, w in zip(line, columns, strict=True)]
        lines.append("  ".join([name.ljust(width), *values]))
    capped = sorted({v for r in results for key, v in r.items() if key.endswith("_capped_to")})
    if capped:
        lines.append(
            f"* computed at k={', '.join(map(str, capped))}: the cache's k (or the vocabulary) "
            "is smaller"
        )
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], labels: Sequence[str], out: str | Path) -> Path:
    """Write a PNG with two panels, overlap@k and consistency@k against k, one line per run
    (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (
        ("overlap", OVERLAP_KS, "top-k overlap rate"),
        ("consistency", CONSISTENCY_KS, "top-k order consistency"),
    )
    for ax, (name, ks, title) in zip(fig.subplots(1, 2), panels, strict=True):
        for result, label in zip(results, labels, strict=True):
            ax.plot(ks, [result[f"{name}@{k}"] for k in ks], marker="o", label=label)
        keys = [f"{name}@{k}_capped_to" for k in ks]
        capped = sorted({r[key] for r in results for key in keys if key in r})
        note = f" (k > {capped[0]} capped to {capped[0]})" if capped else ""
        ax.set_title(title + note)
        ax.set_xlabel("k")
        ax.set_ylabel(f"{name}@k")
        ax.set_xticks(list(ks))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return out


def compare_runs(
    students: Sequence[str],
    cache_dir: str | Path,
    cfg: EvalConfig,
    plot_path: str | Path,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate each student (`run_eval` with `cfg`), plot them; returns `cache`, `plot` and
    `runs` (each result with its `label`)."""
    results = [run_eval(student, cache_dir, cfg, progress) for student in students]
    labels = labels_for(students)
    written = plot(results, labels, plot_path)
    runs = [{"label": label, **result} for label, result in zip(labels, results, strict=True)]
    return {"cache": str(Path(cache_dir)), "plot": str(written), "runs": runs}
