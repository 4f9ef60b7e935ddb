"""What the training loop measures and logs: the run log (``train_log.jsonl`` and the trackers), the sums a
training record averages, and the held-out loss."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from ..tasks.base import TaskAdapter, feedback_kwargs


@dataclass
class RunLog:
    """``train_log.jsonl`` (written by the main process) and the trackers: one record per log or evaluation."""

    path: Path
    accelerator: Accelerator

    def restart(self, resumed_from: int | None) -> dict[str, Any]:
        """Cut the log back to the resumed step (empty it for a fresh run); return the last training record kept
        ({} for a fresh run and off the main process)."""
        if not self.accelerator.is_main_process:
            return {}
        kept = []
        if resumed_from is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_from]
        self.path.write_text("".join(line + "\n" for line in kept))
        return next((record for record in map(json.loads, reversed(kept)) if "train/loss" in record), {})

    def write(self, record: dict[str, Any], step: int) -> None:
        """Append ``record`` at ``step``; its numbers also go to the trackers."""
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **record}) + "\n")


@dataclass
class TrainingStats:
    """What the next training record averages: per-name sums over the micro-batches since the last record
    (float64 tensors, left on the device) and the loop count of each micro-batch."""

    sums: dict[str, Any] = field(default_factory=dict)
    loops: list[int] = field(default_factory=list)

    def add_micro_batch(self, loss: Any, parts: dict[str, Any], loop_stats: Any, num_loops: int) -> None:
        """Add one micro-batch's loss, its parts (when there are several), loop count and loop statistics."""
        self.loops.append(num_loops)
        measured = {
            "train/loss": loss.detach(),
            **({f"train/{name}": value for name, value in parts.items()} if len(parts) > 1 else {}),
            "train/loop_steps": loop_stats.steps.double().mean(),
            "train/rel_residual": loop_stats.final_rel_residual.double().mean(),
            "train/converged": loop_stats.converged.double().mean(),
        }
        for name, value in measured.items():
            self.sums[name] = self.sums.get(name, 0) + value.double()

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Each name's mean over the micro-batches of every process (all processes ran the same number)."""
        totals = accelerator.reduce(torch.stack(list(self.sums.values())), "mean")
        return dict(zip(self.sums, (totals / len(self.loops)).tolist(), strict=True))


@dataclass
class HeldOutSums:
    """One process's sums over held-out batches (float64 tensors on its device): the loss weighted by the rows
    of its batch, the loop statistics summed over rows, and the number of rows."""

    loss: Any
    loop_steps: Any
    rel_residual: Any
    converged: Any
    rows: Any

    @classmethod
    def zeros(cls, device: Any) -> HeldOutSums:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in dataclasses.fields(cls)))

    def add(self, outputs: Any) -> None:
        """Add one batch's model outputs."""
        rows = outputs.logits.shape[0]
        stats = outputs.loop_stats
        self.loss += outputs.loss.double() * rows
        self.loop_steps += stats.steps.double().sum()
        self.rel_residual += stats.final_rel_residual.double().sum()
        self.converged += stats.converged.double().sum()
        self.rows += rows

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """The row-weighted means over every process's rows, as ``eval/<name>``."""
        names = [f.name for f in dataclasses.fields(self)]
        totals = accelerator.reduce(torch.stack([getattr(self, name) for name in names]), "sum").tolist()
        sums = dict(zip(names, totals, strict=True))
        rows = max(sums.pop("rows"), 1.0)
        return {f"eval/{name}": value / rows for name, value in sums.items()}


@torch.no_grad()
def evaluate_loss(
    model: Any, dataset: Any, task: TaskAdapter, accelerator: Accelerator, batch_size: int
) -> dict[str, float]:
    """Held-out loss at the model's inference loop count, plus its loop statistics.

    Every process scores its own contiguous shard of ``dataset`` (no padding rows); the sums are
    reduced across processes, so the result is the row-weighted mean over the whole set.
    """
    shard = dataset.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    # its own generator: creating the iterator then draws no number from the global RNG
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=task.encode, generator=torch.Generator())
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    sums = HeldOutSums.zeros(accelerator.device)
    for batch in loader:
        batch = send_to_device(batch, accelerator.device)
        sums.add(unwrapped(**batch, **feedback_kwargs(task, batch)))
    unwrapped.train(was_training)
    return sums.means(accelerator)
