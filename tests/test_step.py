"""The one training step (`train/step.py`): every caller runs the same functions, and
gradient accumulation divides once by the step's count of distilled positions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, SAMPLE, shallow_copy
from rlkd_cache.cache import run_cache
from rlkd_cache.config import CacheConfig
from rlkd_cache.losses import LossConfig, distill_loss_reference
from rlkd_cache.store.reader import Cache
from rlkd_cache.train import evaluate, loop
from rlkd_cache.train import step as step_module
from rlkd_cache.train.batching import collate
from rlkd_cache.train.step import StepSettings, micro_step, student_hidden, teacher_of, train_step
from rlkd_cache.train.student import lm_head

pytestmark = pytest.mark.usefixtures("one_thread")


def load_benchmark():
    path = REPO / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_loop_eval_and_benchmark_hold_the_same_step_objects():
    import rlkd_cache.eval.run as eval_run

    bench = load_benchmark()
    assert bench.train_step is loop.train_step is step_module.train_step
    assert bench.optimizer_step is loop.optimizer_step is step_module.optimizer_step
    assert evaluate.micro_step is step_module.micro_step
    assert eval_run.student_hidden is step_module.student_hidden
    assert step_module.train_step.__globals__["micro_step"] is step_module.micro_step


@pytest.fixture(scope="module")
def rows_and_model(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("caches")
    cfg = CacheConfig(
        model=str(tiny_teacher),
        dataset=str(SAMPLE),
        split="train[:6]",
        top_k=8,
        cache_root=str(root),
    )
    rows = list(Cache(run_cache(cfg, progress=False)).rows())
    student = shallow_copy(tiny_teacher, tmp_path_factory.mktemp("student"))
    return rows, student


def grads_of(student: Path, fn) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).train()
    fn(model)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_give_the_gradient_of_one_batch(rows_and_model):
    rows, student = rows_and_model
    settings = StepSettings(losses=LossConfig(rank_k=8, ce_weight=0.3), chunk_size=16)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    split = [collate(rows[:2]), collate(rows[2:])]
    whole = collate(rows)
    assert sum(b.n_positions for b in split) == whole.n_positions
    accumulated = grads_of(student, lambda m: train_step(m, split, settings, scaler))
    one = grads_of(student, lambda m: train_step(m, [whole], settings, scaler))
    assert accumulated.keys() == one.keys() and accumulated
    for name, grad in one.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_micro_step_is_the_plain_objective_on_the_students_hidden_states(rows_and_model):
    rows, student = rows_and_model
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    batch = collate(rows)
    losses = LossConfig(rank_k=8)
    out = micro_step(model, batch, StepSettings(losses=losses, chunk_size=7))
    hidden = student_hidden(model, batch)
    torch.testing.assert_close(out.hidden, hidden)
    head = lm_head(model)
    plain = distill_loss_reference(hidden, head.weight, head.bias, teacher_of(batch), None, losses)
    torch.testing.assert_close(out.sums.total, plain.total, rtol=1e-5, atol=1e-5)
