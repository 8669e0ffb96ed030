"""`shallow_student`: a teacher with some decoder layers kept, loadable by plain transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_llama
from rlkd_cache.errors import RlkdError
from rlkd_cache.train.student_init import shallow_student


@pytest.fixture(scope="module")
def deep_teacher(tmp_path_factory, tiny_tokenizer):
    """A 4-layer tiny Llama, so a student can skip layers."""
    return build_llama(tmp_path_factory.mktemp("deep"), tiny_tokenizer, layers=4)


def test_kept_layers_carry_the_teachers_weights(deep_teacher, tmp_path):
    folder = shallow_student(deep_teacher, [0, 3], tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher)
    student = AutoModelForCausalLM.from_pretrained(folder)
    assert student.config.num_hidden_layers == 2
    assert len(student.model.layers) == 2
    for new, old in [(0, 0), (1, 3)]:
        ours = student.model.layers[new].state_dict()
        theirs = teacher.model.layers[old].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    ids = torch.arange(3, 40)[None]  # (1, T)
    with torch.no_grad():  # the KV cache indexes the kept layers by their new positions
        cached = student.generate(ids, max_new_tokens=4, do_sample=False)
        uncached = student.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(deep_teacher).get_vocab()


def test_all_layers_kept_gives_the_teachers_logits(tiny_teacher, tmp_path):
    folder = shallow_student(tiny_teacher, [0, 1], tmp_path / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.arange(3, 40)[None]  # (1, T)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
        generated = student.generate(ids, max_new_tokens=4, do_sample=False)  # uses the KV cache
        assert torch.equal(generated, teacher.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("layers", [[], [1, 0], [0, 0], [2]])
def test_bad_layer_lists_are_refused(tiny_teacher, tmp_path, layers):
    with pytest.raises(RlkdError, match="strictly increasing"):
        shallow_student(tiny_teacher, layers, tmp_path / "student")


def test_random_student_has_the_asked_shape_and_the_teachers_tokenizer(deep_teacher, tmp_path):
    from rlkd_cache.train.student_init import random_student

    folder = random_student(deep_teacher, tmp_path / "random", layers=1, hidden=64, heads=1, seed=3)
    student = AutoModelForCausalLM.from_pretrained(folder)
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 64
    assert student.config.head_dim == 64 and student.config.vocab_size == len(
        AutoTokenizer.from_pretrained(deep_teacher)
    )
    again = AutoModelForCausalLM.from_pretrained(
        random_student(deep_teacher, tmp_path / "again", layers=1, hidden=64, heads=1, seed=3)
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(student.state_dict().values(), again.state_dict().values(), strict=True)
    )
    with pytest.raises(RlkdError, match="multiple of"):
        random_student(deep_teacher, tmp_path / "bad", layers=1, hidden=65)


def test_init_student_command(deep_teacher, tmp_path):
    from click.testing import CliRunner

    from rlkd_cli.main import app

    def init(name: str, *how: str):
        output = str(tmp_path / name)
        return CliRunner().invoke(
            app, ["init-student", "--teacher", str(deep_teacher), *how, "--output", output]
        )

    for name, how, layers in [("s", ("--layers", "0,2"), 2), ("r", ("--random", "3"), 3)]:
        result = init(name, *how)
        assert result.exit_code == 0, result.output
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert loaded.config.num_hidden_layers == layers
    bad = init("x", "--layers", "0,9")
    assert bad.exit_code == 1 and "strictly increasing indices in [0, 4)" in bad.stderr
