"""Run as ``python -m tests.integrations.vllm_tp MODEL``: a two-rank tensor-parallel engine
serves :data:`PICTURES` pruned and prints, as JSON, per picture the indices each rank kept
and the generated tokens. A process of its own: vLLM reads its CPU thread binding once per
process, and the in-process engines of the other tests have read it already."""

import json
import os
import sys

from tests.adapters.conformance import random_pictures

PICTURES = (7, [(52, 60), (66, 60)])


def kept_indices(model) -> list[list[int]]:
    """What the last call kept, per image (module level: vLLM pickles it to its workers)."""
    return [k.tolist() for k in model.zooprune_kept]


def main(path: str) -> None:
    from vllm import LLM, SamplingParams

    import zooprune.integrations.vllm as zv
    from tests.integrations.test_vllm import KEEP, LLAVA_PROMPT, STEPS

    cores = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}|{cores[1]}"  # a core per rank
    llm = LLM(
        model=path,
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        limit_mm_per_prompt={"image": 1},
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        **zv.engine_args(path, method="zoo", keep=KEEP),
    )
    results = []
    for picture in random_pictures(*PICTURES):
        request = {"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": picture}}
        (out,) = llm.generate([request], SamplingParams(max_tokens=STEPS, temperature=0))
        results.append(
            {"kept": llm.apply_model(kept_indices), "tokens": list(out.outputs[0].token_ids)}
        )
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
