"""Students trained through adapters: LoRA and QLoRA with peft, and the optimizer choice.

`--lora-r R` wraps the student with peft's LoRA (`lora_config`): the base is frozen (kept in
bf16 under `--precision bf16`, in 4-bit NF4 with `--load-in-4bit`, else fp32) and only the
adapters train, in fp32. The loss is unchanged: `student.lm_head` reads an adapter on the LM
head as a low-rank term the chunked objective applies chunk by chunk, so no (N, V) logits
exist with or without one. Tied embeddings: "all-linear" leaves the LM head (and so the
shared embedding) frozen and unadapted; an adapter named on a tied head changes the output
side only, and `--merge` of it is refused, since merging would change the embedding too.

Checkpoints of a LoRA run hold the adapters and their optimizer state only (`trained_state`);
`final/` is the adapter in peft's format, and with `--merge` `final/merged/` the adapters
merged into an ordinary Hugging Face model, built from a fresh fp32 load of the base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rlkd_cache.config import TrainConfig
from rlkd_cache.errors import RlkdError

log = logging.getLogger("rlkd.train")

MERGED = "merged"
"""The folder in `final/` of the merged model (`--merge`)."""


def lora_alpha(cfg: TrainConfig) -> float:
    """The adapters' alpha: `--lora-alpha`, else 2 x `--lora-r`."""
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_r


def lora_targets(cfg: TrainConfig) -> str | list[str]:
    """`--lora-targets` as peft takes it: "all-linear", or the list of module names."""
    if cfg.lora_targets.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]


def lora_config(cfg: TrainConfig) -> Any:
    """peft's `LoraConfig` of this run (plain LoRA on the named modules, no bias)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=lora_alpha(cfg),
        target_modules=lora_targets(cfg),
        lora_dropout=cfg.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )


def base_dtype(cfg: TrainConfig) -> torch.dtype:
    """dtype of the student's weights as loaded: a LoRA run's frozen base is kept in bf16
    under `--precision bf16` (autocast casts it to bf16 for every matmul anyway); everything
    else is fp32."""
    return torch.bfloat16 if cfg.lora_r and cfg.precision == "bf16" else torch.float32


def check_device_needs(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, in one line naming what is missing, `--load-in-4bit` and `--optimizer
    adamw8bit` without a CUDA device and bitsandbytes."""
    wants = [
        (
            cfg.load_in_4bit,
            "--load-in-4bit",
            "drop it (LoRA keeps the frozen base in bf16 or fp32)",
        ),
        (cfg.optimizer == "adamw8bit", "--optimizer adamw8bit", "use --optimizer adafactor"),
    ]
    for wanted, name, instead in wants:
        if not wanted:
            continue
        if device.type != "cuda":
            raise RlkdError(
                f"{name} needs a CUDA device (bitsandbytes), and this run's device is "
                f"{device}: {instead}"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise RlkdError(
                f"{name} needs the bitsandbytes package: pip install 'rlkd[qlora]'"
            ) from None


def quantization(cfg: TrainConfig) -> Any:
    """transformers' `BitsAndBytesConfig` of `--load-in-4bit` (NF4, double quantization,
    compute in bf16 under `--precision bf16`, else fp32), or None."""
    if not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def tied_head(student: Any) -> bool:
    """Whether the student's LM head shares its weight with the input embedding."""
    head, embed = student.get_output_embeddings(), student.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def adapt(student: Any, cfg: TrainConfig) -> Any:
    """The student with LoRA adapters on `--lora-targets` (peft), only they trainable in
    fp32; the student itself without `--lora-r`."""
    if not cfg.lora_r:
        return student
    from peft import get_peft_model, prepare_model_for_kbit_training

    targets = lora_targets(cfg)
    head_named = targets != "all-linear" and any(
        name in ("lm_head", "output") or name.endswith(".lm_head") for name in targets
    )
    if head_named and cfg.merge and tied_head(student):
        raise RlkdError(
            "--merge with an adapter on the LM head of a student with tied embeddings: merging "
            "it would change the input embedding too; drop lm_head from --lora-targets, or "
            "--merge"
        )
    if cfg.load_in_4bit:
        student = prepare_model_for_kbit_training(student, use_gradient_checkpointing=False)
    try:  # autocast_adapter_dtype: adapters of a bf16 or fp16 base are made in fp32
        return get_peft_model(student, lora_config(cfg), autocast_adapter_dtype=True)
    except ValueError as e:  # peft: a target module the student does not have
        raise RlkdError(f"--lora-targets {cfg.lora_targets}: {e}") from None


def counts(model: Any) -> tuple[int, int]:
    """(trainable parameters, all parameters) of the student (a tied weight once; a 4-bit
    weight as the parameters it stands for)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if getattr(param, "quant_state", None) is not None:  # bitsandbytes packs 2 per byte
            n *= 2
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def trained_state(student: Any, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the student: its whole state dict, or in a LoRA run the
    trainable adapters only."""
    if not cfg.lora_r:
        return student.state_dict()
    return {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}


def load_trained(student: Any, state: dict[str, torch.Tensor], cfg: TrainConfig, where: Path):
    """Load `trained_state`'s dict into the student; a LoRA checkpoint must hold exactly the
    adapters this run trains."""
    if not cfg.lora_r:
        student.load_state_dict(state)
        return
    wanted = {n for n, p in student.named_parameters() if p.requires_grad}
    if set(state) != wanted:
        raise RlkdError(
            f"{where} does not hold this run's adapters ({len(state)} tensors, {len(wanted)} "
            "expected): resume with the --lora-r and --lora-targets it was written with"
        )
    student.load_state_dict(state, strict=False)


def save_final(student: Any, tokenizer: Any, final: Path, cfg: TrainConfig) -> None:
    """`final/` of a LoRA run: the adapter in peft's format, and with `--merge` also
    `final/merged/`: a fresh fp32 load of the base with the saved adapter applied by plain
    peft and merged (what a user of final/ gets)."""
    student.save_pretrained(final)  # peft: adapter_config.json + adapter_model.safetensors
    tokenizer.save_pretrained(final)
    if cfg.merge:
        merged = merged_model(cfg.student, final)
        merged.save_pretrained(final / MERGED)
        tokenizer.save_pretrained(final / MERGED)
        log.info("merged student in %s", final / MERGED)


def merged_model(base: str | Path, adapter: Path) -> Any:
    """The base student (fp32, CPU) with the adapter saved in `adapter` merged into it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `--optimizer` names over `params`, at `--lr` and `--weight-decay`."""
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
