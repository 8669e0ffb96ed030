"""How good is the censored union's guess for student peaks outside the cache, on real models?

The teacher (default: the embedded SmolLM2-135M-Instruct) runs over held-out rows of the
bundled sample as plain text and gives its FULL distribution at every position, so the
teacher's true log-prob of every token is known. A student (default: the 4-layer student built
from the teacher's layers 0, 10, 20, 29; or any folder, such as a trained run's `final/`) gives
its logits. For each guess of `ranking.CensoredGuess` the ranking loss is computed twice over
the same union (teacher top-rank_k ∪ student top-rank_k): with the cache's view (top-k known,
the rest guessed) and with the teacher's true scores. Prints, per guess, the mean |censored -
true| loss per position and the cosine between the two losses' gradients (higher is better),
and where the guessed tokens truly sit next to the guess and the k-th cached value. The LAST
line is one JSON object with the figures.

    python benchmarks/rank_guess.py [--student DIR ...] [--rows 40] [--k 20] [--rank-k 15]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkd_cache.cache import resolve_model
from rlkd_cache.config import CacheConfig
from rlkd_cache.data import bundled_sample, load_rows
from rlkd_cache.losses.ranking import CensoredGuess, rank_union
from rlkd_cache.losses.softrank import rank_correlation, soft_rank
from rlkd_cache.train.student_init import shallow_student

LAYERS = [0, 10, 20, 29]


def logits_of(folder: Path, texts: list[str], tokenizer: object) -> Tensor:
    """(N, V) next-token logits of the model in `folder` at every position of `texts`."""
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :256]  # type: ignore[operator]
            rows.append(model(input_ids=ids).logits[0, :-1])
    return torch.cat(rows)


def loss_and_grad(z: Tensor, peaks: object) -> tuple[Tensor, Tensor]:
    """Per-position 1 - rho over the union, and its gradient with respect to z."""
    z = z.detach().clone().requires_grad_(True)
    student = soft_rank(torch.gather(z, -1, peaks.ids), 1.0, peaks.valid)  # type: ignore[attr-defined]
    teacher = soft_rank(peaks.teacher_scores, 1.0, peaks.valid)  # type: ignore[attr-defined]
    loss = 1 - rank_correlation(student, teacher, peaks.valid)  # type: ignore[attr-defined]
    loss.sum().backward()
    return loss.detach(), z.grad.flatten()  # type: ignore[union-attr]


def measure(teacher: Tensor, student: Tensor, k: int, rank_k: int) -> dict[str, dict[str, float]]:
    """The figures of every guess for one (teacher, student) pair of (N, V) logits."""
    lp = teacher.log_softmax(-1)
    values, ids = lp.sort(-1, descending=True)
    targets = ids[:, 0]  # stand-in actual token inside the cache: every outside token is guessed
    true = rank_union(student, ids, values, targets, values[:, 0], rank_k=rank_k, union="censored")
    true_loss, true_grad = loss_and_grad(student, true)
    out = {}
    for guess in get_args(CensoredGuess):
        peaks = rank_union(
            student, ids[:, :k], values[:, :k], targets, values[:, 0],
            rank_k=rank_k, union="censored", guess=guess,
        )  # fmt: skip
        loss, grad = loss_and_grad(student, peaks)
        outside = ~(peaks.ids[:, rank_k:, None] == ids[:, None, :k]).any(-1)  # (N, r)
        out[guess] = {
            "abs_loss_error": (loss - true_loss).abs().mean().item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(grad, true_grad, 0).item(),
            "guess_mean": peaks.teacher_scores[:, rank_k:][outside].mean().item(),
            "true_mean": lp.gather(-1, peaks.ids[:, rank_k:])[outside].mean().item(),
            "kth_mean": values[:, k - 1].mean().item(),
            "top1_agreement": (student.argmax(-1) == ids[:, 0]).float().mean().item(),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", action="append", default=[], help="student folder(s)")
    parser.add_argument("--rows", type=int, default=40, help="held-out rows of the sample")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rank-k", type=int, default=15)
    parser.add_argument("--work", default="/tmp/rlkd-rank-guess", help="where the student is built")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher_dir = resolve_model(CacheConfig())
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = load_rows(str(bundled_sample()), f"train[300:{300 + args.rows}]")
    texts = [f"{row['prompt']}\n\n{row['response']}" for row in rows]
    teacher = logits_of(teacher_dir, texts, tokenizer)
    students = args.student or []
    if not students:
        built = Path(args.work) / "layers-0-10-20-29"
        if not (built / "config.json").is_file():
            shallow_student(teacher_dir, LAYERS, built)
        students = [str(built)]
    figures = {}
    for folder in students:
        result = measure(teacher, logits_of(Path(folder), texts, tokenizer), args.k, args.rank_k)
        figures[folder] = result
        for guess, f in result.items():
            print(
                f"{folder} [{guess}]: |censored - true| loss {f['abs_loss_error']:.4f}/position, "
                f"gradient cosine {f['grad_cosine']:.3f}; guessed tokens truly at "
                f"{f['true_mean']:.2f}, guess {f['guess_mean']:.2f}, k-th cached "
                f"{f['kth_mean']:.2f} (top-1 agreement {f['top1_agreement']:.3f})"
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
