"""`rlkd train --lora-r`: LoRA students through peft on tiny local models. Only the adapters
train, the student learns, the adapter and the merged model load without rlkd and give the
trained model's logits, a killed run resumes to the same adapters, the chunked objective with
an adapter on the head is the plain one, and what needs CUDA says so in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.tensorboard import SummaryWriter

from conftest import fails, invoke, train_config, train_killed_and_resumed
from rlkd_cache.config import TrainConfig
from rlkd_cache.losses import LossConfig
from rlkd_cache.losses.chunked import TeacherTopK, distill_loss, distill_loss_reference
from rlkd_cache.train.loop import run_steps, setup, train
from rlkd_cache.train.student import lm_head


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory, student) -> Path:
    """The same student with its LM head tied to the input embedding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(student)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(student).save_pretrained(folder)
    return folder


def config(caches, student, output, **over) -> TrainConfig:
    """test_train.py's run, with LoRA r 8 (no dropout) and a checkpoint every 20 steps."""
    changed = {"save_every": 20, "lora_r": 8, "lora_dropout": 0.0, **over}
    return train_config(caches, student, output, **changed)


def evals(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["kind"] == "eval"]


def sample_ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_lora_changes_only_the_adapters_and_the_student_learns(caches, student, tmp_path):
    """The loop's own setup and steps: every base weight stays bitwise equal, every adapter
    moves, the held-out KL falls, and the counts are printed and in config.json."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(student).state_dict()
    cfg = config(caches, student, tmp_path / "run", max_steps=30, eval_cache=None)
    run = setup(cfg)
    before = {n: p.detach().clone() for n, p in run.student.named_parameters() if p.requires_grad}
    with (tmp_path / "metrics.jsonl").open("w") as run.metrics:
        run.board = SummaryWriter(str(tmp_path / "board"))
        run_steps(run, progress=False)
    names = {n for n, p in run.student.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    for name, param in run.student.named_parameters():
        if name in names:
            assert not torch.equal(param, before[name]), f"{name} did not train"
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param, original[plain]), f"base weight {name} changed"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lora_r"] == 8 and saved["lora_targets"] == "all-linear"
    trainable = sum(before[n].numel() for n in names)
    assert saved["trainable_parameters"] == trainable < saved["parameters"]
    assert saved["trainable_share"] == pytest.approx(trainable / saved["parameters"], abs=1e-6)
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "step-00000020" / "state.pt", weights_only=True
    )
    assert set(state["model"]) == names  # a checkpoint holds the adapters only

    trained = train(config(caches, student, tmp_path / "full", max_steps=40), progress=False)
    first, last = evals(tmp_path / "full")[0], evals(tmp_path / "full")[-1]
    assert last["kl"] < first["kl"] - 0.03, (first["kl"], last["kl"])
    assert (trained / "adapter_config.json").is_file()
    assert not (trained / "model.safetensors").exists()


def test_adapter_and_merged_model_load_without_rlkd_and_give_the_trained_logits(
    caches, student, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = config(caches, student, tmp_path / "run", max_steps=12, merge=True, eval_cache=None)
    final = train(cfg, progress=False)
    ids = sample_ids()
    held = setup(replace(cfg, max_steps=12))  # the trained run, resumed from its last checkpoint
    assert held.step == 12
    with torch.no_grad():
        trained = held.student.eval()(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), final)
        via_peft = adapter.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
        via_merged = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(student).eval()(input_ids=ids).logits
    torch.testing.assert_close(via_peft, trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_merged, trained, rtol=1e-4, atol=3e-4)  # fp32 sum order
    assert (via_merged - base).abs().max() > 1e-3  # the adapters changed the student
    # `rlkd eval` of the run folder uses final/merged/; of the adapter alone, its base
    lines = invoke("eval", "--student", str(tmp_path / "run"), "--cache", str(caches["eval"]))
    assert any("kl" in line for line in lines)
    import shutil

    shutil.rmtree(final / "merged")
    again = invoke(
        "eval", "--student", str(tmp_path / "run"), "--cache", str(caches["eval"]), "--recompute"
    )
    kl = [line for line in lines if line.split()[:1] == ["kl"]]
    assert kl == [line for line in again if line.split()[:1] == ["kl"]] and kl


def test_chunked_objective_with_a_lora_head_equals_the_plain_one(student):
    """Values and gradients (hidden, A, B) of the chunked objective with an adapter on the
    head, against plain autograd through peft's own head module's logits."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlkd_cache.losses.chunked import _part_sums, _weighted, position_mask
    from rlkd_cache.train.lora import lora_config

    cfg = TrainConfig(cache="c", student=str(student), output="o", lora_r=8, lora_dropout=0.0)
    cfg = replace(cfg, lora_targets="q_proj,lm_head")
    model = AutoModelForCausalLM.from_pretrained(student)
    model = get_peft_model(model, lora_config(cfg)).eval()
    torch.manual_seed(0)
    peft_head = model.get_output_embeddings()
    torch.nn.init.normal_(next(iter(peft_head.lora_B.values())).weight, std=0.05)
    head = lm_head(model)
    assert head.lora_a is not None and not head.weight.requires_grad
    n, vocab = 37, head.weight.shape[0]
    hidden = torch.randn(n, head.weight.shape[1], requires_grad=True)
    logprobs = torch.log_softmax(torch.randn(n, vocab), -1)
    top = logprobs.topk(16, -1)
    target = torch.randint(0, vocab, (n,))
    actual = logprobs.gather(1, target[:, None])[:, 0]
    teacher = TeacherTopK(top.indices, top.values, target, actual)
    losses = LossConfig(rank_k=8, ce_weight=0.3)
    params = (hidden, head.lora_a, head.lora_b)

    chunked = distill_loss(
        hidden, head.weight, head.bias, teacher, None, losses, chunk_size=5,
        low=head.low_rank(hidden),
    )  # fmt: skip
    got = torch.autograd.grad(chunked.total, params)
    logits = peft_head(hidden).float()  # peft's forward: base + B(A(x)) * scaling
    keep = position_mask(None, n, hidden.device)
    plain = _weighted(*_part_sums(logits, teacher, keep, losses), losses)
    want = torch.autograd.grad(plain, params)
    torch.testing.assert_close(chunked.total, plain, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("hidden", "A", "B"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    reference = distill_loss_reference(
        hidden, head.weight, head.bias, teacher, None, losses, low=head.low_rank(hidden)
    )
    torch.testing.assert_close(reference.total, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.logits(hidden), logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_stay_frozen_and_a_merged_tied_head_adapter_is_refused(
    caches, tied_student, tmp_path
):
    cfg = config(caches, tied_student, tmp_path / "run", max_steps=4, eval_cache=None)
    run = setup(cfg)
    head, embed = run.student.get_output_embeddings(), run.student.get_input_embeddings()
    assert head.weight is embed.weight and not head.weight.requires_grad
    line = fails(
        "train", "--cache", str(caches["train"]), "--student", str(tied_student),
        "--output", str(tmp_path / "r2"), "--lora-r", "4", "--lora-targets", "q_proj,lm_head",
        "--merge",
    )  # fmt: skip
    assert "tied embeddings" in line and "--merge" in line


def test_gradient_checkpointing_and_adafactor_with_lora(caches, student, tmp_path):
    """Checkpointing gives the same adapters (non-reentrant: the frozen embedding gives no
    input gradient); Adafactor trains on CPU (the held-out KL falls)."""
    over = {"max_steps": 6, "eval_cache": None}
    a = train(config(caches, student, tmp_path / "a", **over), progress=False)
    b = train(
        config(caches, student, tmp_path / "b", gradient_checkpointing=True, **over),
        progress=False,
    )
    wa, wb = (load_file(f / "adapter_model.safetensors") for f in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)
    train(config(caches, student, tmp_path / "ada", optimizer="adafactor"), progress=False)
    first, last = evals(tmp_path / "ada")[0], evals(tmp_path / "ada")[-1]
    assert last["kl"] < first["kl"] - 0.03, (first["kl"], last["kl"])


def test_what_needs_cuda_is_one_line_on_cpu(caches, student, tmp_path):
    args = ["train", "--cache", str(caches["train"]), "--student", str(student)]
    line = fails(*args, "--output", str(tmp_path / "a"), "--lora-r", "8", "--load-in-4bit")
    assert "--load-in-4bit needs a CUDA device" in line and "cpu" in line
    line = fails(*args, "--output", str(tmp_path / "b"), "--optimizer", "adamw8bit")
    assert "--optimizer adamw8bit needs a CUDA device" in line and "adafactor" in line
    line = fails(*args, "--output", str(tmp_path / "c"), "--load-in-4bit")
    assert "--load-in-4bit" in line and "--lora-r" in line
    line = fails(*args, "--output", str(tmp_path / "d"), "--lora-r", "4", "--lora-targets", "nope")
    assert "--lora-targets nope" in line
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_same_adapters(caches, student, tmp_path):
    logged = train_killed_and_resumed(
        [
            "--cache", str(caches["train"]), "--student", str(student), "--lr", "3e-3",
            "--max-steps", "30", "--batch-tokens", "256", "--grad-accum", "2",
            "--save-every", "3", "--keep-last", "2", "--lora-r", "8", "--no-progress",
        ],
        tmp_path,
    )  # fmt: skip
    assert "training " in logged and "LoRA r=8" in logged  # the counts line
    wa = load_file(tmp_path / "clean" / "final" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_bf16_lora_keeps_the_frozen_base_in_bf16_and_trains_fp32_adapters(
    caches, student, tmp_path
):
    cfg = config(caches, student, tmp_path / "run", max_steps=3, precision="bf16", eval_cache=None)
    run = setup(cfg)
    dtypes = {p.requires_grad: p.dtype for p in run.student.parameters()}
    assert dtypes == {False: torch.bfloat16, True: torch.float32}
    before = {n: p.detach().clone() for n, p in run.student.named_parameters() if p.requires_grad}
    with (tmp_path / "metrics.jsonl").open("w") as run.metrics:
        run.board = SummaryWriter(str(tmp_path / "board"))
        run_steps(run, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logged if m["kind"] == "train")
    moved = [n for n, p in run.student.named_parameters() if p.requires_grad]
    assert all(not torch.equal(dict(run.student.named_parameters())[n], before[n]) for n in moved)
