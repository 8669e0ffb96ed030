"""Build a student from its teacher: a shallower copy that keeps some of the decoder layers.

A student must share the teacher's tokenizer (the cache is indexed by its token ids), and
starting from the teacher's own weights makes distillation converge far faster than a random
init. `shallow_student` keeps the teacher's embeddings, the chosen decoder layers (in order),
the final norm and the LM head, and saves a plain Hugging Face folder (`save_pretrained` plus
the teacher's tokenizer) that loads with no rlkd code. Llama-family decoders only: the model
must expose `model.layers` as a list of blocks whose attention carries a `layer_idx`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlkd_cache.errors import RlkdError


def shallow_student(teacher_dir: str | Path, layers: list[int], out_dir: str | Path) -> Path:
    """Save the teacher with only `layers` (strictly increasing indices) as a student.

    Args:
        teacher_dir: local Hugging Face folder of a Llama-family causal LM and its tokenizer.
        layers: indices of the teacher's decoder layers to keep, e.g. [0, 6, 12, 18, 24, 29].
        out_dir: folder to write; created if missing.

    Returns:
        `out_dir` as a Path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise RlkdError(f"{teacher_dir}: not a Llama-family decoder (no model.layers list)")
    depth = len(blocks)
    if not layers or any(not 0 <= i < depth for i in layers) or sorted(set(layers)) != layers:
        raise RlkdError(
            f"layers must be strictly increasing indices in [0, {depth}), got {layers} "
            f"(the teacher at {teacher_dir} has {depth} decoder layers)"
        )
    kept = torch.nn.ModuleList(blocks[i] for i in layers)
    for new_index, block in enumerate(kept):
        block.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    model.model.layers = kept
    model.config.num_hidden_layers = len(kept)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        model.config.layer_types = [layer_types[i] for i in layers]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(out)
    return out


def random_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    *,
    layers: int,
    hidden: int | None = None,
    heads: int | None = None,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised student of the teacher's family and tokenizer.

    The config is the teacher's with `layers` decoder layers and, if given, `hidden` width
    (intermediate size scaled alike) and `heads` attention heads (KV heads capped to it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(teacher_dir))
    if layers < 1:
        raise RlkdError(f"a student needs at least one layer, got {layers}")
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:layers]
    if hidden is not None:
        scale = hidden / config.hidden_size
        config.intermediate_size = max(1, round(config.intermediate_size * scale))
        config.hidden_size = hidden
    if heads is not None:
        config.num_attention_heads = heads
        config.num_key_value_heads = min(heads, getattr(config, "num_key_value_heads", heads))
    head_dim = getattr(config, "head_dim", None)
    if (hidden is not None or heads is not None) and head_dim is not None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    if config.hidden_size % config.num_attention_heads:
        raise RlkdError(
            f"hidden {config.hidden_size} must be a multiple of the {config.num_attention_heads} "
            "attention heads (pass --heads)"
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(out)
    return out
