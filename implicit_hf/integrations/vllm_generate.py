"""Greedy generation with vLLM, for the vLLM tests and benchmarks: run with the Python of the environment
that has vLLM (``.venv-vllm``, ``make vllm-env``)::

    python -m implicit_hf.integrations.vllm_generate MODEL_DIR REQUEST.json RESULT.json

REQUEST.json: ``{"prompts": [[token ids], ...], "max_new_tokens": N, "engines": [{"num_loops": K, ...}, ...]}``,
and optionally ``"repeats": R`` (default 1). Every entry of ``engines`` is one engine's ``hf_overrides`` (e.g.
``{"num_loops": 24, "tol": 3e-4}``); all engines are built and warmed up first, then each generates the prompts,
engine after engine, R times over (so their timings are taken side by side). RESULT.json: ``{"vllm": version,
"engines": [...]}``, per engine its overrides, whether prefix caching is on, the generated ids per prompt (of the
last pass; every pass must give the same), the seconds and tokens/s of each pass, and what its loop spent over the
last pass (``halting_statistics``).
``LLM(...)`` must run under ``__main__`` (vLLM starts workers).
"""

import json
import sys
import time


def main() -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from implicit_hf.integrations.vllm import WORKER_EXTENSION

    model_dir, request_path, result_path = sys.argv[1:4]
    request = json.loads(open(request_path).read())
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    engines = []
    for overrides in request["engines"]:
        llm = LLM(
            model=model_dir,
            dtype="float32",
            max_model_len=256,
            hf_overrides=overrides,
            enforce_eager=True,
            worker_extension_cls=WORKER_EXTENSION,
            gpu_memory_utilization=0.15,  # on the CPU backend: the share of RAM reserved (for the KV cache)
            seed=0,
        )
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        prefix_caching = llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        engines.append(
            (llm, {"overrides": overrides, "prefix_caching": prefix_caching, "seconds": [], "tokens_per_s": []})
        )
    for _ in range(request.get("repeats", 1)):
        for llm, result in engines:
            llm.collective_rpc("halting_statistics", kwargs={"reset": True})
            began = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - began
            generated = [list(output.outputs[0].token_ids) for output in outputs]
            if result.setdefault("tokens", generated) != generated:
                raise RuntimeError(f"greedy outputs changed between passes of the engine {result['overrides']}")
            result["seconds"].append(seconds)
            result["tokens_per_s"].append(sum(map(len, generated)) / seconds)
            result["statistics"] = llm.collective_rpc("halting_statistics")[0]
    with open(result_path, "w") as handle:
        json.dump({"vllm": vllm.__version__, "engines": [result for _, result in engines]}, handle)


if __name__ == "__main__":
    main()
