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
