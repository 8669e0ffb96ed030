"""`rlkd train --plan`: the peak memory of a training run, estimated from config.json alone.

Nothing is allocated: the student is built on the meta device (with its LoRA adapters, by
`lora.adapt`) to count parameters exactly, and the rest is arithmetic on its shapes and the
micro-batch's. The rows of the plan, in bytes:

- weights in their dtype: fp32 for full fine-tuning; a LoRA base in `lora.base_dtype`, its
  adapters fp32; with `--load-in-4bit` the decoder's linear weights in NF4 (0.5 B/param plus
  8-bit absmax per block of 64 and fp32 absmax per 256 blocks), the rest fp32 (peft's
  prepare_model_for_kbit_training). Under autocast every linear weight not stored in the
  autocast dtype also has a cast copy, saved for the backward ("weight copies").
- gradients of what trains (fp32), and the optimizer's state: AdamW 8 B/param; 8-bit AdamW
  2 B/param (fp32 for tensors under 4096 elements, as bitsandbytes does); Adafactor (no first
  moment) a row and a column of fp32 per matrix, a full fp32 copy per vector.
- activations: what autograd keeps for the backward (`layer_bytes`, per token, by reading
  the Llama-family layer; a frozen linear keeps nothing of its input), with and without
  gradient checkpointing (then each layer's input, plus one layer recomputed at a time). The
  batches are padded, so transformers passes SDPA a (B, 1, T, T) mask, which each layer
  converts to the compute dtype and keeps; with a mask, k and v are repeated to every head.
  Attention itself is O(T) (flash / memory-efficient kernels: output and log-sum-exp).
- the chunked loss' working set (`loss_bytes`), the backward's and the optimizer step's
  temporaries (`step_bytes`).

The peak is the largest of five moments (`MemoryPlan.phases`): the end of the decoder's
forward, the loss, the start and the end of the backward, and the optimizer step. It is a
plan for a CUDA device unless `--device cpu` (AdamW's foreach step and dropout's bool masks
differ), plus a fixed allowance for the CUDA context and the allocator. Left out: tensors
under a few MiB (rotary tables, per-row norms, the loss' (C, rank_k, k) masks), and the
first layer's inputs that need no gradient under LoRA (the plan treats every layer as a
middle one). tests/test_memory_plan.py holds the estimate within 25% of the peak measured
on CPU (real training steps) for full fine-tuning with and without checkpointing, with
Adafactor, and LoRA in fp32 and bf16.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from rlkd_cache.config import CacheConfig, TrainConfig
from rlkd_cache.errors import RlkdError
from rlkd_cache.train import lora

MIB, GIB = 2**20, 2**30
DEFAULT_K = 20
"""Top-k assumed when the training cache cannot be read."""
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per 4-bit parameter: NF4, 8-bit absmax per 64 weights, fp32 absmax per 256 blocks."""
CUDA_ALLOWANCE = GIB
"""Fixed allowance for the CUDA context, cuBLAS workspaces and allocator fragmentation."""
LINEARS = {
    "q_proj": "attention in",
    "k_proj": "attention in",
    "v_proj": "attention in",
    "o_proj": "attention out",
    "gate_proj": "mlp in",
    "up_proj": "mlp in",
    "down_proj": "mlp product",
}
"""The Llama-family decoder layer's linears, by the tensor each reads."""


@dataclass(frozen=True)
class Student:
    """The shapes and parameter counts of a student as a run trains it (`student_of`)."""

    architecture: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    """All parameters (a tied weight once)."""
    trainable: int
    decoder_linear: int
    """Parameters of the decoder's linear weights (what 4-bit quantizes)."""
    largest: int
    """Elements of the largest trainable tensor."""
    adafactor_state: int
    """Elements of Adafactor's state over the trainable tensors."""
    small_trainable: int
    """Elements of trainable tensors under 4096 elements (fp32 state in 8-bit AdamW)."""
    adapted: frozenset[str]
    """Which of `LINEARS` carry a LoRA adapter."""
    head_trains: bool
    """Whether the LM head's weight itself trains (full fine-tuning)."""


@functools.lru_cache(maxsize=16)
def _count(folder: str, lora_r: int, lora_targets: str, lora_dropout: float) -> Student:
    """`student_of` for one setting of what the adapters change (cached: suggestions re-plan)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise RlkdError(f"cannot read the student's config.json in {folder}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    architecture = type(model).__name__
    layers = getattr(model.get_decoder(), "layers", None) or [torch.nn.Module()]
    found = {
        n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)
    }
    if found != set(LINEARS):
        raise RlkdError(
            f"--plan knows Llama-family decoder layers ({', '.join(LINEARS)}); "
            f"{architecture} has {sorted(found)}"
        )
    head = model.get_output_embeddings()
    decoder_linear = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    cfg = TrainConfig(lora_r=lora_r, lora_targets=lora_targets, lora_dropout=lora_dropout)
    model = lora.adapt(model, cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    trainable, params = lora.counts(model)  # what the run logs and saves, counted the same way
    layer = model.get_decoder().layers[0]
    adapted = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if hasattr(m, "lora_A")}
    heads = config.num_attention_heads
    return Student(
        architecture=architecture,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=head.weight.shape[0],
        tied=head.weight is model.get_input_embeddings().weight,
        params=params,
        trainable=trainable,
        decoder_linear=decoder_linear,
        largest=max((p.numel() for p in trained), default=0),
        adafactor_state=sum(
            p.numel() if p.dim() < 2 else p.numel() // p.shape[-1] + p.numel() // p.shape[-2]
            for p in trained
        ),
        small_trainable=sum(p.numel() for p in trained if p.numel() < 4096),
        adapted=frozenset(adapted & set(LINEARS)),
        head_trains=head.weight.requires_grad,
    )


def student_of(cfg: TrainConfig) -> Student:
    """The student of `cfg`, counted on the meta device from its config.json (no weights)."""
    return _count(str(cfg.student), cfg.lora_r, cfg.lora_targets, cfg.lora_dropout)


@dataclass(frozen=True)
class BatchShape:
    """The micro-batch a plan is for."""

    tokens: int
    """B x T, padding included."""
    row_len: int
    """T, the longest row (it sizes the attention masks)."""
    positions: int
    """N, distilled positions."""
    k: int
    """The cache's top-k."""
    assumed: str = ""
    """What was assumed for want of a readable cache ("" if nothing)."""

    @classmethod
    def planned(cls, cfg: TrainConfig) -> BatchShape:
        """A full `--batch-tokens` batch of rows as long as the cache's `--max-length`, every
        position distilled; without a readable cache, k 20 and rows up to 1024 tokens."""
        try:
            info = cfg.open_cache(cfg.cache).info
            k, longest, assumed = info.k, int(info.config["max_length"]), ""
        except (RlkdError, OSError, KeyError):
            k, longest = DEFAULT_K, CacheConfig.max_length
            assumed = f"no readable cache at {cfg.cache!r}: assumed top-k {k}, rows <= {longest}"
        tokens = cfg.batch_tokens
        return cls(tokens, min(longest, tokens), tokens, k, assumed)

    def with_tokens(self, tokens: int) -> BatchShape:
        """The same rows and cache with another token budget."""
        return dataclasses.replace(
            self,
            tokens=tokens,
            row_len=min(self.row_len, tokens),
            positions=min(self.positions, tokens),
        )


def _dtypes(cfg: TrainConfig) -> tuple[int, int, bool]:
    """(bytes of the compute dtype, of the residual stream, autocast on): autocast makes
    matmul outputs bf16/fp16; the residual stream is in the embedding's dtype, which is also
    that of every weight that neither trains nor is quantized."""
    compute = 4 if cfg.precision == "fp32" else 2
    residual = 4 if not cfg.lora_r or cfg.load_in_4bit else lora.base_dtype(cfg).itemsize
    return compute, residual, cfg.precision != "fp32"


def layer_bytes(s: Student, cfg: TrainConfig, cuda: bool) -> int:
    """Bytes per token one decoder layer keeps for its backward (its mask aside).

    Norms keep their input in fp32, and their normalized input when their weight trains.
    SDPA keeps q, k, v (repeated to every head) and its output in the compute dtype, plus a
    fp32 log-sum-exp per head; the output is also o_proj's input. The MLP keeps gate,
    silu(gate) and up. A linear whose weight trains keeps its input: under autocast its own
    cast copy, else the tensor it shares with its neighbours (q/k/v, gate/up). A LoRA adapter
    keeps its dropout mask (bool on CUDA, fp32 on CPU), its input (a cast copy under
    autocast, else the dropped-out copy, or without dropout the shared tensor) and its (T, r)
    output of A."""
    compute, residual, autocast = _dtypes(cfg)
    full = not cfg.lora_r
    attention = s.heads * s.head_dim
    width = {"attention in": s.hidden, "attention out": attention, "mlp in": s.hidden}
    width["mlp product"] = s.intermediate
    dtype = {"attention in": residual, "attention out": compute, "mlp in": residual}
    dtype["mlp product"] = compute
    kept = {"attention out"}  # SDPA keeps its output anyway

    def shared(source: str) -> int:
        """The tensor `source` itself, counted once per layer."""
        if source in kept:
            return 0
        kept.add(source)
        return width[source] * dtype[source]

    total = 2 * s.hidden * (4 + (residual if full else 0))  # two RMSNorms
    total += 4 * attention * compute + 4 * s.heads  # q, k, v, output; log-sum-exp
    total += 3 * s.intermediate * compute  # gate, silu(gate), up
    for name, source in LINEARS.items():
        if full:  # the base linear's input
            cast = autocast and dtype[source] != compute
            total += width[source] * compute if cast else shared(source)
        if name in s.adapted:
            total += cfg.lora_r * compute  # A's output
            if cfg.lora_dropout > 0:
                total += width[source] * (1 if cuda else 4)  # the dropout mask
            if autocast or cfg.lora_dropout > 0:  # its own copy: cast, or dropped out (fp32)
                total += width[source] * compute
            else:
                total += shared(source)
    return total


def loss_bytes(s: Student, cfg: TrainConfig, batch: BatchShape) -> int:
    """The chunked objective's working set (`losses/chunked.py`), its head gradient aside.

    The hidden states and their gradient (N, H); per chunk of C positions three (C, V) fp32
    buffers (the logits, the saved exp of `_TopkAndTail`, its gradient), two more with a CE
    weight; under bf16 a bf16 copy of an fp32 head weight, and a (V, H) bf16 product per chunk
    when it trains; the batch's tensors (top-k ids and log-probs)."""
    _, residual, _ = _dtypes(cfg)
    head = 2 if cfg.precision == "bf16" else residual  # bytes of the head's matmul dtype
    chunk = min(cfg.chunk_size, batch.positions)
    buffers = 4 * chunk * s.vocab * (3 + (2 if cfg.ce_weight > 0 else 0))
    cast = head != residual  # the head weight is stored in the residual stream's dtype
    copies = 2 * s.vocab * s.hidden * (int(cast) + int(cast and s.head_trains))
    hidden = 2 * batch.positions * s.hidden * residual
    teacher = batch.positions * (12 * batch.k + 28) + 16 * batch.tokens
    return buffers + copies + hidden + teacher


def step_bytes(s: Student, cfg: TrainConfig, cuda: bool) -> int:
    """The optimizer step's temporaries: AdamW's foreach step on CUDA holds one fp32 tensor
    per trainable parameter (the square root of the second moment), torch's per-tensor step
    on CPU and Adafactor two of the largest; bitsandbytes updates in place."""
    if cfg.optimizer == "adamw8bit":
        return 0
    if cfg.optimizer == "adamw" and cuda:
        return 4 * s.trainable
    return 2 * 4 * s.largest


def state_bytes(s: Student, cfg: TrainConfig) -> int:
    """The optimizer's state over the trainable parameters (see the module docstring)."""
    if cfg.optimizer == "adafactor":
        return 4 * s.adafactor_state
    if cfg.optimizer == "adamw8bit":
        big = s.trainable - s.small_trainable
        return 8 * s.small_trainable + 2 * big + 8 * math.ceil(big / 256)
    return 8 * s.trainable


@dataclass(frozen=True)
class MemoryPlan:
    """A run's estimated memory, part by part (bytes), and its peak (`total`)."""

    cfg: TrainConfig
    batch: BatchShape
    student: Student
    weights: int
    weight_copies: int
    """Autocast's cast copies of the linear weights, kept for the backward."""
    gradients: int
    optimizer_state: int
    activations: int
    """Kept for the backward, with the run's `--gradient-checkpointing` setting."""
    activations_other: int
    """The same with the other setting."""
    loss: int
    """The chunked loss' working set (the head's gradient is in `gradients`)."""
    backward: int
    """Gradients of the residual stream and of the MLP while a layer's backward runs."""
    step: int
    """The optimizer step's temporaries."""
    allowance: int
    """`CUDA_ALLOWANCE` on a CUDA device, else 0."""
    phases: dict[str, int]
    """Memory in use at each moment that can be the peak, the allowance aside."""

    @property
    def peak_phase(self) -> str:
        """The moment of the peak."""
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> int:
        """The estimated peak: the largest phase, plus the allowance."""
        return self.phases[self.peak_phase] + self.allowance

    def fits(self, limit: int) -> bool:
        """Whether the peak fits `limit` bytes."""
        return self.total <= limit

    def table(self) -> str:
        """The plan as a titled table, one part per row, then the peak and its moment."""
        cfg, s = self.cfg, self.student
        mode = f"LoRA r {cfg.lora_r}" if cfg.lora_r else "full fine-tuning"
        weights = "fp32"
        if cfg.lora_r:
            base = "bf16" if lora.base_dtype(cfg) == torch.bfloat16 else "fp32"
            base = "NF4 linears, the rest fp32" if cfg.load_in_4bit else base
            weights = f"base {base}, adapters fp32"
        checkpointing = "with" if cfg.gradient_checkpointing else "without"
        other = "without" if cfg.gradient_checkpointing else "with"
        rows = [
            (f"weights ({weights})", self.weights),
            (f"weight copies ({cfg.precision} autocast, for the backward)", self.weight_copies),
            ("gradients (fp32, what trains)", self.gradients),
            (f"optimizer state ({cfg.optimizer})", self.optimizer_state),
            (
                f"activations {checkpointing} checkpointing "
                f"({other}: {size(self.activations_other)})",
                self.activations,
            ),
            (f"loss working set (chunk {cfg.chunk_size} x vocab {s.vocab:,})", self.loss),
            ("backward working set", self.backward),
            ("optimizer step working set", self.step),
            ("CUDA context and allocator (allowance)", self.allowance),
        ]
        title = (
            f"memory plan: {s.architecture}, {s.params / 1e6:,.1f} M parameters, "
            f"{s.trainable / 1e6:,.1f} M trainable ({'Q' if cfg.load_in_4bit else ''}{mode})\n"
            f"  --precision {cfg.precision}, {self.batch.tokens:,} tokens per micro-batch (rows "
            f"<= {self.batch.row_len:,}, top-k {self.batch.k}), --optimizer {cfg.optimizer}, "
            f"on {'a CUDA device' if self.allowance else 'the CPU'}"
        )
        lines = [title] + [f"  {name:<62} {size(n):>10}" for name, n in rows if n]
        lines.append(f"  {'peak, at the ' + self.peak_phase:<62} {size(self.total):>10}")
        moments = ", ".join(f"{name} {size(n)}" for name, n in self.phases.items())
        lines.append(f"  ({moments})")
        return "\n".join(lines + ([f"  {self.batch.assumed}"] if self.batch.assumed else []))

    def suggestions(self, limit: int) -> list[tuple[str, MemoryPlan]]:
        """Settings that would fit `limit`, as the flags to add with their plans, best first
        and at most 3: the single changes that fit, else the first of the changes added one
        by one (in the order of `_changes`, so LoRA comes before 4-bit) that fits, with a
        smaller batch if need be."""
        fitting = []
        for flags, over in _changes(self.cfg, bool(self.cfg.lora_r)):
            plan = self.replanned(**over)
            if plan.fits(limit):
                fitting.append((flags, plan))
        if (smaller := self.smaller_batch(limit)) is not None:
            fitting.append(smaller)
        if fitting:
            return fitting[:3]
        words: list[str] = []
        over: dict[str, Any] = {}
        for flags, change in _changes(self.cfg, True):
            words.append(flags)
            over.update(change)
            plan = self.replanned(**over)
            if plan.fits(limit):
                return [(" ".join(words), plan)]
            if (smaller := plan.smaller_batch(limit)) is not None:
                return [(" ".join([*words, smaller[0]]), smaller[1])]
        return []

    def replanned(self, **over: Any) -> MemoryPlan:
        """The plan of this run with some settings changed."""
        cfg = dataclasses.replace(self.cfg, **over)
        return estimate(cfg, self.batch.with_tokens(cfg.batch_tokens))

    def smaller_batch(self, limit: int) -> tuple[str, MemoryPlan] | None:
        """The largest halving of `--batch-tokens` (no shorter than a row) that fits, with
        `--grad-accum` raised to keep the tokens of an optimizer step; None if none does."""
        tokens, accum = self.cfg.batch_tokens // 2, self.cfg.grad_accum * 2
        while tokens >= max(self.batch.row_len, 2):
            plan = self.replanned(batch_tokens=tokens, grad_accum=accum)
            if plan.fits(limit):
                return f"--batch-tokens {tokens} --grad-accum {accum}", plan
            tokens, accum = tokens // 2, accum * 2
        return None

    def verdict(self, limit: int) -> str:
        """Whether the run fits `limit` bytes, and if not, which settings would."""
        if self.fits(limit):
            return f"fits {size(limit)} with {size(limit - self.total)} to spare"
        head = f"does not fit {size(limit)}: needs {size(self.total)}"
        found = self.suggestions(limit)
        if not found:
            return head + "; none of the settings tried fits (a smaller student, or more devices)"
        lines = [head + "; would fit:"]
        lines += [f"  {flags:<62} {size(plan.total):>10}" for flags, plan in found]
        return "\n".join(lines)


def _changes(cfg: TrainConfig, lora_on: bool) -> list[tuple[str, dict[str, Any]]]:
    """The setting changes tried, as (flags, config fields), cheapest in speed and quality
    first: checkpointing, bf16, Adafactor, LoRA, then 4-bit (with LoRA on)."""
    changes: list[tuple[str, dict[str, Any]]] = []
    if not cfg.gradient_checkpointing:
        changes.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if cfg.precision == "fp32":
        changes.append(("--precision bf16", {"precision": "bf16"}))
    if cfg.optimizer == "adamw":
        changes.append(("--optimizer adafactor", {"optimizer": "adafactor"}))
    if not cfg.lora_r:
        changes.append(("--lora-r 16", {"lora_r": 16}))
    if lora_on and not cfg.load_in_4bit:
        changes.append(("--load-in-4bit (needs CUDA)", {"load_in_4bit": True}))
    return changes


def estimate(cfg: TrainConfig, batch: BatchShape | None = None) -> MemoryPlan:
    """The memory plan of `cfg` for `batch` (default: `BatchShape.planned`)."""
    batch = batch or BatchShape.planned(cfg)
    s = student_of(cfg)
    cuda = cfg.device != "cpu"
    compute, residual, autocast = _dtypes(cfg)
    full = not cfg.lora_r
    tokens = batch.tokens
    quantized = s.decoder_linear if cfg.load_in_4bit else 0
    frozen = s.params - s.trainable - quantized
    weights = 4 * s.trainable + residual * frozen + math.ceil(NF4_BYTES * quantized)
    base_cast = s.decoder_linear if residual != compute and not quantized else 0  # fp32 bases
    copies = compute * (base_cast + (0 if full else s.trainable)) if autocast else 0
    per_layer = tokens * (layer_bytes(s, cfg, cuda) + batch.row_len * compute)  # + its mask
    # the final norm's inputs, the input ids, the (B, 1, T, T) bool mask
    fixed = tokens * (s.hidden * (4 + (residual if full else 0)) + 8 + batch.row_len)
    without = fixed + s.layers * per_layer
    inputs = fixed + tokens * s.layers * residual * s.hidden  # checkpointing keeps these
    if cfg.gradient_checkpointing:  # and recomputes one layer at a time in the backward
        kept, recompute, kept_copies = inputs, per_layer + copies // s.layers, 0
        activations, other = inputs + per_layer, without
    else:
        kept, recompute, kept_copies = without, 0, copies
        activations, other = without, inputs + per_layer
    grads, state = 4 * s.trainable, state_bytes(s, cfg)
    head_grad = 4 * s.vocab * s.hidden if s.head_trains else 0
    loss = loss_bytes(s, cfg, batch)
    backward = tokens * (2 * 4 * s.hidden + 3 * compute * s.intermediate)
    grad_hidden = batch.positions * s.hidden * residual
    embedding_grad = head_grad if s.tied else 0  # summed into the tied head's gradient
    base = weights + state
    start = kept_copies + kept + recompute + head_grad + grad_hidden + backward
    phases = {
        "forward end": base + copies + kept,
        "loss": base + kept_copies + kept + head_grad + loss,
        "backward start": base + start,
        "backward end": base + grads + backward + recompute + embedding_grad,
        "optimizer step": base + grads + step_bytes(s, cfg, cuda),
    }
    return MemoryPlan(
        cfg, batch, s, weights, copies, grads, state, activations, other, loss, backward,
        step_bytes(s, cfg, cuda), CUDA_ALLOWANCE if cuda else 0, phases,
    )  # fmt: skip


UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "kb": 10**3,
    "mib": MIB,
    "mb": 10**6,
    "gib": GIB,
    "gb": 10**9,
}
"""`--gpu-memory` units, lower case: binary (GiB) and decimal (GB)."""


def parse_size(text: str) -> int:
    """Bytes of a `--gpu-memory` size: a number with GiB, GB, MiB, MB, KiB, KB or no unit."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if not found or unit not in UNITS or float(found.group(1)) <= 0:
        raise RlkdError(
            f"--gpu-memory must be a size like 24GiB, 80GB or 512MiB (GiB, GB, MiB, MB, or "
            f"bytes without a unit), got {text!r}"
        )
    return int(float(found.group(1)) * UNITS[unit])


def size(n: float) -> str:
    """`n` bytes for people: GiB from 1 GiB on, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def plan_text(cfg: TrainConfig, gpu_memory: str | None = None) -> str:
    """What `rlkd train --plan` prints: the plan's table, and with `gpu_memory` (a size, see
    `parse_size`) whether the run fits it, or which settings would."""
    limit = None if gpu_memory is None else parse_size(gpu_memory)
    plan = estimate(cfg)
    return plan.table() + ("" if limit is None else "\n" + plan.verdict(limit))
