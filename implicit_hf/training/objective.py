"""What a training step minimises: the task loss, plus the optional stabilisers and distillation.

    task      = mean(loss at the last iterate, loss at each ``deep_supervision`` count < this step's loops)
    loss      = (1 - w) * task + w * T² * KL(teacher_T || student_T)          with a teacher (w = distill weight)
              + jacobian_penalty * ||∂f/∂z||_F² / d + fixed_point_penalty * ||f(z) - z||² / ||z||²

* Deep supervision decodes earlier iterations from the trajectory (``return_trajectory``); their
  gradient reaches the core where the gradient mode makes those iterations differentiable
  (``unroll``: all of them; ``truncated`` / ``phantom``: the last ``gradient_steps``), else only the
  coda and head, which then learn to read out unfinished states.
* The penalties are measured at the last iterate (``modeling/penalties.py``): one more core evaluation.
* Distillation compares next-token distributions at temperature ``T`` on the positions the task
  scores (labels other than -100; every attended position when a batch has no labels). The teacher
  is any frozen ``AutoModelForCausalLM`` checkpoint with the student's vocabulary, run in eval mode
  on the same batch, e.g. the unconverted source of a retrofit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


@dataclass
class Objective:
    """The training loss of one step (see the module docstring); ``teacher`` is an eval-mode model or None."""

    deep_supervision: tuple[int, ...] = ()
    jacobian_penalty: float = 0.0
    fixed_point_penalty: float = 0.0
    teacher: torch.nn.Module | None = None
    distill_weight: float = 0.0
    temperature: float = 1.0
    penalty_weights: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        weights = {"jacobian": self.jacobian_penalty, "fixed_point": self.fixed_point_penalty}
        self.penalty_weights = {name: weight for name, weight in weights.items() if weight > 0}

    def forward_kwargs(self, num_loops: int) -> dict[str, Any]:
        """What the model's forward must also return for this objective at ``num_loops`` iterations."""
        kwargs: dict[str, Any] = {}
        counts = [count for count in self.deep_supervision if count < num_loops]
        if counts:
            kwargs["return_trajectory"], kwargs["trajectory_loops"] = True, counts
        if self.penalty_weights:
            kwargs["penalties"] = tuple(self.penalty_weights)
        return kwargs

    def __call__(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to backpropagate and its detached parts (``task_loss``, ``distill``, each penalty)."""
        task_loss = outputs.loss
        if outputs.trajectory_loss is not None:
            task_loss = torch.cat([task_loss[None], outputs.trajectory_loss]).mean()
        loss, parts = task_loss, {"task_loss": task_loss}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
                ).logits
            distill = distillation_loss(
                outputs.logits, teacher_logits, batch.get("labels"), batch.get("attention_mask"), self.temperature
            )
            loss = (1 - self.distill_weight) * loss + self.distill_weight * distill
            parts["distill"] = distill
        for name, weight in self.penalty_weights.items():
            loss = loss + weight * outputs.penalties[name]
            parts[name] = outputs.penalties[name]
        return loss, {name: value.detach() for name, value in parts.items()}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """``T² · KL(teacher || student)`` of the next-token distributions at temperature ``T``, averaged over the
    positions whose next token is scored (``labels[:, 1:] != -100``; else ``attention_mask[:, 1:]``; else all).
    The two logits have one shape: `check_teacher` refused a teacher of another vocabulary before training."""
    student = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if labels is not None:
        scored = labels[:, 1:] != -100
    elif attention_mask is not None:
        scored = attention_mask[:, 1:].bool()
    else:
        scored = torch.ones_like(kl, dtype=torch.bool)
    return (kl * scored).sum() / scored.sum().clamp_min(1) * temperature**2


def check_teacher(path: str | Path, vocab_size: int, tokenizer: Any = None) -> None:
    """Refuse a teacher that is not a causal-LM checkpoint or whose vocabulary differs from the student's
    (``vocab_size``, and the tokenizers' vocabularies when both have one), without loading its weights."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"teacher {str(path)!r} is not a checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"teacher {str(path)!r}: cannot read its config: {err}") from err
    if config.vocab_size != vocab_size:
        raise ValueError(
            f"teacher {str(path)!r} has a vocabulary of {config.vocab_size} tokens, the student {vocab_size}: "
            "distillation needs the same tokenizer and vocabulary"
        )
    if tokenizer is None or not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    if AutoTokenizer.from_pretrained(str(path)).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"teacher {str(path)!r} has another tokenizer than the student (same size, different tokens): "
            "distillation needs the same tokenizer"
        )


def load_teacher(path: str | Path, device: torch.device) -> torch.nn.Module:
    """The teacher: ``AutoModelForCausalLM.from_pretrained(path)``, frozen, in eval mode, on ``device``."""
    teacher = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
    return teacher.requires_grad_(False)
