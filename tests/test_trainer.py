"""transformers.Trainer trains an implicit model as it is."""

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from implicit_hf import ImplicitForCausalLM


def counting_sequences(n: int, length: int = 16, vocab: int = 32, seed: int = 0) -> Dataset:
    """Sequences that count upwards modulo ``vocab`` from a random start: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=generator)
    ids = (starts + torch.arange(length)) % vocab
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def test_trainer_trains_and_evaluates_an_implicit_lm(tmp_path, tiny_causal_lm):
    model = tiny_causal_lm(vocab_size=32, num_loops=4, gradient="jfb")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=60,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    train, held_out = counting_sequences(256), counting_sequences(64, seed=1)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)
    trainer.save_model(str(tmp_path / "model"))
    reloaded = ImplicitForCausalLM.from_pretrained(tmp_path / "model").eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        generated = reloaded.generate(prompt, max_new_tokens=4, do_sample=False, num_loops=4)
    assert generated[0, 4:].tolist() == [9, 10, 11, 12]


def test_trainer_takes_a_tasks_per_position_labels(tmp_path, tiny_task_model):
    """state_tracking's labels are not the next input token (the state after every update): transformers.Trainer
    trains on them through the task's own encode as the data collator, with the model's causal-LM loss."""
    from implicit_hf.tasks.base import get_task

    task = get_task("state_tracking", cache_dir=tmp_path / "data", objects=3, steps=[1, 3])
    model = tiny_task_model(task, num_coda_layers=0, loop_shift=1, num_loops=5, gradient="unroll")
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=80, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=3e-3, remove_unused_columns=False, save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=task.build_dataset("train", 2560, 0),
        eval_dataset=task.build_dataset("validation", 128, 0),
        data_collator=task.encode,
    )
    batch = task.encode(list(task.build_dataset("validation", 4, 0)))
    assert (batch["labels"] != -100).sum() > 4  # several labelled positions per row
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.6 * before, (before, after)
