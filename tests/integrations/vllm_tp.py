"""Run as ``python -m tests.integrations.vllm_tp MODEL SPEC``: a two-rank tensor-parallel
engine serves pictures pruned and prints, as JSON, per picture the indices each rank kept,
the generated tokens and the first step's best log-probabilities. SPEC (JSON) says what to
serve: ``prompt``, ``dtype``, ``keep``, ``options`` (the method's), ``pictures`` (a seed and
sizes for ``random_pictures``), ``steps``, ``banned`` (tokens never generated) and
``logprobs`` (how many of the first step's best to report). A process of its own: vLLM
reads its CPU thread binding once per process, and the in-process engines of the other
tests have read it already."""

import json
import os
import sys

from tests.adapters.conformance import random_pictures


def kept_indices(model) -> list[list[int]]:
    """What the last call kept, per image (module level: vLLM pickles it to its workers)."""
    return [k.tolist() for k in model.zooprune_kept]


def main(path: str, spec: dict) -> None:
    from vllm import LLM, SamplingParams

    import zooprune.integrations.vllm as zv

    cores = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"  # a core per rank
    llm = LLM(
        model=path,
        enforce_eager=True,
        dtype=spec["dtype"],
        max_model_len=1024,
        limit_mm_per_prompt={"image": 1, "video": 0},
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        **zv.engine_args(path, method="zoo", keep=spec["keep"], **spec["options"]),
    )
    vocabulary = llm.get_tokenizer().vocab_size
    params = SamplingParams(
        max_tokens=spec["steps"],
        temperature=0,
        allowed_token_ids=[i for i in range(vocabulary) if i not in spec["banned"]],
        logprobs=spec["logprobs"],
    )
    results = []
    for picture in random_pictures(*spec["pictures"]):
        request = {"prompt": spec["prompt"], "multi_modal_data": {"image": picture}}
        (out,) = llm.generate([request], params)
        first = out.outputs[0].logprobs[0]
        results.append(
            {
                "kept": llm.apply_model(kept_indices),
                "tokens": list(out.outputs[0].token_ids),
                "first_logprobs": {str(token): p.logprob for token, p in first.items()},
            }
        )
    print("RESULT " + json.dumps(results), flush=True)


def serve(path, spec: dict) -> list[dict]:
    """Run :func:`main` in a process of its own; what it printed, or the failure with its
    error output."""
    import subprocess

    run = subprocess.run(
        [sys.executable, "-m", "tests.integrations.vllm_tp", str(path), json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
