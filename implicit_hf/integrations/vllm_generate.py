"""Greedy generation with vLLM, for the vLLM test and benchmark: run with the Python of the environment
that has vLLM (``.venv-vllm``, ``make vllm-env``)::

    python -m implicit_hf.integrations.vllm_generate MODEL_DIR REQUEST.json RESULT.json

REQUEST.json: ``{"prompts": [[token ids], ...], "max_new_tokens": N, "loops": [K, ...]}``, and optionally
``"tol": t`` (halting at ``t``, at most K loops). For every K an engine is built with ``hf_overrides={"num_loops":
K}`` (and ``"tol": t``); RESULT.json maps str(K) to the generated ids per prompt, the tokens/s of each engine and
what its loop spent (``halting_statistics``), after a warm-up.
``LLM(...)`` must run under ``__main__`` (vLLM starts workers).
"""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from implicit_hf.integrations.vllm import WORKER_EXTENSION

    model_dir, request_path, result_path = sys.argv[1:4]
    request = json.loads(open(request_path).read())
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    result = {}
    halting = {} if request.get("tol") is None else {"tol": request["tol"]}
    for loops in request["loops"]:
        llm = LLM(
            model=model_dir,
            dtype="float32",
            max_model_len=256,
            hf_overrides={"num_loops": loops, **halting},
            enforce_eager=True,
            worker_extension_cls=WORKER_EXTENSION,
            gpu_memory_utilization=0.15,  # on the CPU backend: the share of RAM reserved (for the KV cache)
            seed=0,
        )
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
        llm.collective_rpc("halting_statistics", kwargs={"reset": True})
        began = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - began
        generated = [list(output.outputs[0].token_ids) for output in outputs]
        result[str(loops)] = {
            "tokens": generated,
            "tokens_per_s": sum(len(ids) for ids in generated) / seconds,
            "statistics": llm.collective_rpc("halting_statistics")[0],
        }
        del llm
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
