"""FastV: visual tokens ranked and dropped inside the language model (``zooprune.lm_stage``).

The families' tiny random models (the testers of ``tests/adapters/test_llava.py`` and
``test_qwen2_vl.py``), rebuilt with a 4-layer language model so that FastV's default
``layer=2`` leaves two layers that see every token and two that see the kept ones; each is
saved with ``save_pretrained`` and loaded with ``from_pretrained``.

Layer convention (FastV's): ``layer=K`` runs decoder layers ``0 .. K-1`` (0-based) on every
token, ranks by the attention of layer ``K-1``, and layers ``K ..`` see the kept tokens
only. The references below say so independently of the stage: the unpruned model with
the dropped tokens masked out of layers ``>= K``, and layer ``K-1``'s attention matrix
from the eager implementation.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    DynamicCache,
    GenerationConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    MistralConfig,
    PhiConfig,
    StaticCache,
)
from transformers import LlavaNextForConditionalGeneration as LlavaNext

import zooprune
from tests.adapters.conformance import image_inputs, untouched
from tests.adapters.test_llava import LlavaTester
from tests.adapters.test_qwen2_vl import QwenTester
from zooprune import METHODS, PruneError
from zooprune.adapters import adapter_for
from zooprune.lm_stage import LMStageHandle, language_model
from zooprune.select.fastv import query_attention, top_k_ascending
from zooprune.tiny import SPECIAL, tiny_llava_config

DEPTH = 4  # decoder layers of the language models here
EOS = SPECIAL.index("</s>")
TESTERS = {
    "llava": LlavaTester(),
    "qwen2-vl": QwenTester("qwen2-vl"),
    "qwen2.5-vl": QwenTester("qwen2.5-vl"),
}


def build_deeper(tester, path: Path) -> Path:
    """The family's tiny model with a ``DEPTH``-layer language model, saved to ``path``."""
    tester.build(path)
    config = AutoConfig.from_pretrained(path)
    text = config.text_config
    text.num_hidden_layers = DEPTH
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[0]] * DEPTH
    generation = GenerationConfig.from_pretrained(path)
    torch.manual_seed(0)
    model = tester.model_class(config).eval()
    model.generation_config = generation
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(TESTERS))
def family(request, tmp_path_factory):
    """``(tester, saved path, processor, pictures)`` of one family."""
    tester = TESTERS[request.param]
    path = build_deeper(tester, tmp_path_factory.mktemp(request.param))
    return tester, path, tester.processor(), tester.pictures()


@pytest.fixture
def vlm(family):
    tester, path, _, _ = family
    return tester.load(path)


def one_prompt(family, picture: int = 0, prompt: int = 2) -> dict:
    tester, _, proc, pictures = family
    return tester.inputs(
        proc, [pictures[picture : picture + 1]], tester.prompts[prompt : prompt + 1]
    )


def banned(tester) -> list[int]:
    """Tokens greedy decoding may not emit: a new placeholder, or an early end (every
    prompt then runs all its steps)."""
    return sorted({*tester.banned, EOS})


def greedy(model, tester, batch, steps: int, **options):
    return model.generate(
        **batch, max_new_tokens=steps, do_sample=False, suppress_tokens=banned(tester), **options
    )


def dropped_columns(batch, tester, selection) -> torch.Tensor:
    """Prompt 0's image placeholders that the selection did not keep."""
    placeholders = (batch["input_ids"][0] == tester.image_token).nonzero().flatten()
    kept = set(selection.images[0].positions.tolist())
    return torch.tensor([c for c in placeholders.tolist() if c not in kept], dtype=torch.long)


def masked_from_layer(model, batch, layer: int, dropped: torch.Tensor) -> torch.Tensor:
    """The unpruned model's logits with ``dropped`` prompt columns masked out of attention
    in decoder layers ``>= layer`` (the earlier layers see every token). One prompt, no
    padding: an explicit causal mask without those keys replaces each later layer's."""
    length = batch["input_ids"].shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[:, dropped] = False
    mask = allowed[None, None]

    def hide(module, args, kwargs):
        return args, kwargs | {"attention_mask": mask}

    hooks = [
        later.register_forward_pre_hook(hide, with_kwargs=True)
        for later in language_model(model).layers[layer:]
    ]
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        for hook in hooks:
            hook.remove()


def hooks_of(model) -> list[tuple[str, list, list]]:
    """Every module's forward hooks (transformers' own output hooks included)."""
    return [
        (name, list(m._forward_pre_hooks.items()), list(m._forward_hooks.items()))
        for name, m in model.named_modules()
    ]


# -- the ranking kernel ----------------------------------------------------------------


def test_query_attention_is_the_explicit_softmax_row_averaged_over_heads():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 6, 2, 9, 8
    query = torch.randn(batch, heads, dim)
    keys = torch.randn(batch, kv_heads, length, dim)
    allowed = torch.rand(batch, length) > 0.3
    allowed[:, 0] = True
    # Brute force: each query head against its key head (repeat_kv), masked, softmax.
    expected = torch.zeros(batch, length)
    for b in range(batch):
        for h in range(heads):
            k = keys[b, h // (heads // kv_heads)]
            logits = (k @ query[b, h]) / dim**0.5
            logits[~allowed[b]] = float("-inf")
            expected[b] += logits.softmax(dim=0) / heads
    got = query_attention(query, keys, allowed, dim**-0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert bool((got[~allowed] == 0).all())
    # Ties go to the lower index; the picks come back ascending.
    assert top_k_ascending(torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5]), 2).tolist() == [1, 2]


def test_fastv_is_registered_as_an_in_lm_method():
    spec = METHODS["fastv"]
    assert spec.needs == frozenset({"lm_stage"}) and spec.options == {"layer": 2}
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(PruneError, match="layer must be an int"):
            spec.resolve_options({"layer": bad})


# -- the model-level invariants ---------------------------------------------------------


def test_keeping_every_token_is_a_noop(family, vlm):
    tester = family[0]
    batch = one_prompt(family)
    logits = vlm(**batch).logits
    tokens = greedy(vlm, tester, batch, 4)
    with zooprune.prune(vlm, "fastv", ratio=1.0) as handle:
        torch.testing.assert_close(vlm(**batch).logits, logits, rtol=0, atol=1e-5)
        assert torch.equal(greedy(vlm, tester, batch, 4), tokens)
    image = handle.selection.images[0]
    assert image.kept == image.num_tokens and handle.selection.details == {"layer": 2}


@pytest.mark.parametrize("layer", [1, 2, DEPTH])
def test_pruned_forward_equals_masking_the_dropped_tokens_from_layer_k_on(family, vlm, layer):
    tester = family[0]
    batch = one_prompt(family)
    with zooprune.prune(vlm, "fastv", keep=tester.keep, layer=layer) as handle:
        pruned = vlm(**batch).logits
    dropped = dropped_columns(batch, tester, handle.selection)
    keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
    keep[dropped] = False
    assert handle.selection.kept == tester.keep and pruned.shape[1] == int(keep.sum())
    reference = masked_from_layer(vlm, batch, layer, dropped)
    torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)
    if layer < DEPTH:  # masking them from layer K-1 on instead is another model
        earlier = masked_from_layer(vlm, batch, layer - 1, dropped)
        assert not torch.allclose(pruned[0], earlier[0, keep], rtol=0, atol=1e-3)


def test_ranking_is_layer_k_minus_1s_attention_from_the_last_prompt_token(family):
    tester, path, _, _ = family
    eager = tester.load(path, attn_implementation="eager")
    batch = one_prompt(family)
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    columns = (batch["input_ids"][0] == tester.image_token).nonzero().flatten()
    for layer in (1, 3):
        expected = attentions[layer - 1][0, :, -1, columns].mean(dim=0)  # heads averaged
        with zooprune.prune(eager, "fastv", keep=tester.keep, layer=layer) as handle:
            eager(**batch)
        image = handle.selection.images[0]
        torch.testing.assert_close(image.scores, expected, rtol=0, atol=1e-6)
        top = expected.argsort(descending=True)[: tester.keep].sort().values
        assert torch.equal(image.indices, top)
        assert torch.equal(image.positions, columns[top])


def test_generate_with_cache_equals_the_uncached_loop(family, vlm):
    tester = family[0]
    batch = one_prompt(family, picture=3, prompt=0)
    prompt = batch["input_ids"].shape[1]
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        generated = greedy(vlm, tester, batch, 6)
        cached_pick = handle.selection.indices[0]
        ids = batch["input_ids"]
        # Each step recomputes the whole prefix, ranking by the last prompt token as
        # generate's prefill did.
        with handle.query_at(prompt - 1):
            for _ in range(6):
                logits = vlm(
                    input_ids=ids, **image_inputs(batch), **tester.step_inputs(ids), use_cache=False
                ).logits
                logits[..., banned(tester)] = float("-inf")
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                assert torch.equal(handle.selection.indices[0], cached_pick)
    assert torch.equal(generated, ids)


def test_a_batch_equals_its_prompts_one_by_one(family, vlm):
    # Left padding, prompts of different lengths, one with two images: the rows lose
    # different numbers of tokens inside the language model.
    tester, _, proc, pictures = family
    image = tester.image_text
    prompts = [tester.prompts[0], f"{tester.prompts[1]} {image} and this ?", tester.prompts[2]]
    per_prompt = [pictures[:1], pictures[1:3], pictures[3:4]]
    batch = tester.inputs(proc, per_prompt, prompts)
    assert bool((batch["attention_mask"][:, 0] == 0).any())
    scored = {"output_scores": True, "return_dict_in_generate": True}
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        together = greedy(vlm, tester, batch, 4, **scored)
        assert [s.prompt for s in handle.selection.images] == [0, 1, 1, 2]
        picks = handle.selection.indices
        alone_picks = []
        for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
            alone = greedy(vlm, tester, tester.inputs(proc, [group], [prompt]), 4, **scored)
            alone_picks += handle.selection.indices
            assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
            for step in range(4):
                torch.testing.assert_close(
                    together.scores[step][row], alone.scores[step][0], rtol=0, atol=1e-4
                )
    assert all(torch.equal(a, b) for a, b in zip(picks, alone_picks, strict=True))


def test_remove_restores_the_model_exactly(family, vlm):
    tester, path, _, _ = family
    batch = one_prompt(family)
    before = vlm(**batch).logits
    attributes = dict(vlm.__dict__)
    hooks = hooks_of(vlm)
    handle = zooprune.prune(vlm, "fastv", keep=tester.keep)
    assert isinstance(handle, LMStageHandle)
    assert vlm(**batch).logits.shape[1] < before.shape[1]
    handle.remove()
    handle.remove()  # harmless twice
    assert vlm.__dict__.keys() == attributes.keys()
    assert all(vlm.__dict__[k] is v for k, v in attributes.items())
    assert hooks_of(vlm) == hooks
    assert torch.equal(vlm(**batch).logits, before)
    fresh = tester.load(path)
    assert torch.equal(greedy(vlm, tester, batch, 4), greedy(fresh, tester, batch, 4))


def test_a_deep_copy_is_pruned_on_its_own(family, vlm):
    tester = family[0]
    batch = one_prompt(family)
    handle = zooprune.prune(vlm, "fastv", keep=tester.keep)
    pruned = vlm(**batch).logits
    twin = copy.deepcopy(vlm)
    handle.remove()
    other = zooprune.handle_of(twin)
    assert isinstance(other, LMStageHandle) and other.stage.text is language_model(twin)
    torch.testing.assert_close(twin(**batch).logits, pruned, rtol=0, atol=0)
    other.remove()
    assert twin(**batch).logits.shape == vlm(**batch).logits.shape


def test_observers_hear_of_the_choice_once_the_language_model_made_it(family, vlm):
    tester = family[0]
    batch = one_prompt(family)
    heard = []
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        handle.observe(lambda selection, error: heard.append((selection, error)))
        greedy(vlm, tester, batch, 2)
        with pytest.raises(PruneError, match="labels"):
            vlm(**batch, labels=batch["input_ids"])
    assert heard[0] == (handle.selection, None) and heard[0][0].kept == tester.keep
    assert heard[1][0] is None and isinstance(heard[1][1], PruneError)


def test_bad_calls_and_options_are_refused_with_the_model_untouched(family, vlm):
    tester = family[0]
    batch = one_prompt(family)
    with pytest.raises(PruneError, match=rf"layer=5 is past the {DEPTH} decoder layers"):
        zooprune.prune(vlm, "fastv", keep=3, layer=5)
    with pytest.raises(PruneError, match="layer must be an int >= 1"):
        zooprune.prune(vlm, "fastv", keep=3, layer=0)
    assert untouched(vlm) and not language_model(vlm).layers[1]._forward_pre_hooks
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        with pytest.raises(PruneError, match="no pruned arguments"):
            handle.prepare(dict(batch))
        with handle.query_at(batch["input_ids"].shape[1]):
            with pytest.raises(PruneError, match="outside the"):
                vlm(**batch)


def test_other_families_are_refused_naming_the_models_that_can():
    config = LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": 28,
            "patch_size": 14,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        text_config=tiny_llava_config().text_config.to_dict(),
        image_grid_pinpoints=[[28, 28]],
        image_token_id=4,
    )
    model = LlavaNext(config)
    with pytest.raises(PruneError, match="runs inside the language model") as error:
        zooprune.prune(model, "fastv", keep=4)
    message = str(error.value)
    assert "LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration" in message
    usable = message.split("methods that apply: ")[1].split(", ")
    assert "fastv" not in usable and "zoo" in usable
    assert untouched(model)


# -- refusals ---------------------------------------------------------------------------


@contextlib.contextmanager
def module_calls() -> Iterator[list[str]]:
    """The class names of every module called inside the block (vision towers included)."""
    calls: list[str] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__)
    )
    try:
        yield calls
    finally:
        hook.remove()


def llava_with_text_model(text_config) -> LlavaForConditionalGeneration:
    """The tiny LLaVA with another language model, in memory (only ``prune()`` runs)."""
    config = tiny_llava_config()
    config.text_config = text_config
    return LlavaForConditionalGeneration(config).eval()


SMALL_TEXT = {
    "vocab_size": 64,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(
    "generation",
    [
        {"num_beams": 2},
        {"num_return_sequences": 2, "do_sample": True},
        {"generation_config": GenerationConfig(num_beams=2)},
    ],
    ids=["num_beams", "num_return_sequences", "generation_config"],
)
def test_several_sequences_per_prompt_are_refused_before_the_vision_encoder(
    family, vlm, generation
):
    tester = family[0]
    batch = one_prompt(family)
    heard = []
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        handle.observe(lambda selection, error: heard.append((selection, error)))
        with module_calls() as calls, pytest.raises(PruneError, match="one sequence per prompt"):
            vlm.generate(**batch, max_new_tokens=2, **generation)
    assert calls == [] and handle.selection is None
    assert len(heard) == 1 and heard[0][0] is None and isinstance(heard[0][1], PruneError)


@pytest.mark.parametrize(
    "generation",
    [{"use_cache": False}, {"generation_config": GenerationConfig(use_cache=False)}],
    ids=["use_cache", "generation_config"],
)
def test_generate_without_the_cache_is_refused_before_the_vision_encoder(family, vlm, generation):
    # Without the cache, generate() runs the whole prompt again at every step: only the
    # first step would be pruned, the rest silently the unpruned model's.
    tester = family[0]
    batch = one_prompt(family)
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        with module_calls() as calls, pytest.raises(PruneError, match="use_cache=False"):
            vlm.generate(**batch, max_new_tokens=2, **generation)
    assert calls == [] and handle.selection is None and untouched(vlm)


def test_positions_other_than_original_are_refused(family, vlm):
    with pytest.raises(PruneError, match="positions='compact' does not apply"):
        zooprune.prune(vlm, "fastv", keep=3, positions="compact")
    assert untouched(vlm)
    with zooprune.prune(vlm, "fastv", keep=3, positions="original") as handle:
        assert handle.positions == "original"


@pytest.mark.parametrize("family", ["qwen2-vl"], indirect=True)
def test_a_call_with_videos_is_refused(family, vlm):
    tester, _, proc, _ = family
    batch = tester.video_inputs(
        proc, [[]], [[tester.videos[0]]], [f"<s> user {tester.video_text} describe"]
    )
    heard = []
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        handle.observe(lambda selection, error: heard.append((selection, error)))
        with pytest.raises(PruneError, match="prunes images; this call holds videos"):
            vlm(**batch)
    assert len(heard) == 1 and isinstance(heard[0][1], PruneError)


@pytest.mark.parametrize("family", ["qwen2-vl"], indirect=True)
def test_the_familys_layout_options_are_refused(family, vlm):
    with pytest.raises(PruneError, match=r"layout option\(s\) video_budget do not apply"):
        zooprune.prune(vlm, "fastv", keep=3, video_budget="global")
    assert untouched(vlm)


@pytest.mark.parametrize("kind", ["static", "sliding"])
def test_caches_of_other_layers_are_refused_naming_them(family, vlm, kind):
    tester = family[0]
    text = vlm.config.get_text_config(decoder=True)
    if kind == "static":
        cache, layers = StaticCache(config=text, max_cache_len=128), "StaticLayer"
    else:  # a DynamicCache, but of sliding-window layers
        sliding = copy.deepcopy(text)
        sliding.layer_types = ["sliding_attention"] * DEPTH
        sliding.sliding_window = 64
        cache, layers = DynamicCache(config=sliding), "DynamicSlidingWindowLayer"
    with zooprune.prune(vlm, "fastv", keep=tester.keep):
        with pytest.raises(PruneError, match=f"this {type(cache).__name__} has {layers} layers"):
            vlm(**one_prompt(family), past_key_values=cache)


def test_a_chunked_prefill_is_refused(family, vlm):
    tester = family[0]
    batch = one_prompt(family)
    with zooprune.prune(vlm, "fastv", keep=tester.keep):
        with pytest.raises(PruneError, match=r"got 4 of its \d+ tokens \(chunked prefill\?\)"):
            greedy(vlm, tester, batch, 2, prefill_chunk_size=4)


def test_query_at_refuses_columns_that_are_not_one_int_per_prompt(family, vlm):
    tester, _, proc, pictures = family
    batch = tester.inputs(
        proc, [pictures[:1], pictures[3:4]], [tester.prompts[0], tester.prompts[2]]
    )
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle:
        for columns in (3.7, [1.0, 2.0], [[1, 2]], True, "3"):
            with pytest.raises(PruneError, match="query_at takes"):
                with handle.query_at(columns):
                    pass
        with handle.query_at([-1, -1, -1]):  # 3 columns, 2 prompts
            with pytest.raises(PruneError, match="3 query_at columns for 2 prompts"):
                vlm(**batch)
    assert untouched(vlm)


def test_query_at_a_padding_column_is_refused(family, vlm):
    tester, _, proc, pictures = family
    batch = tester.inputs(
        proc, [pictures[:1], pictures[3:4]], [tester.prompts[0], tester.prompts[2]]
    )
    assert bool((batch["attention_mask"][:, 0] == 0).any())  # left padding
    with zooprune.prune(vlm, "fastv", keep=tester.keep) as handle, handle.query_at(0):
        with pytest.raises(PruneError, match="include a padding token"):
            vlm(**batch)


@pytest.mark.parametrize(
    ("text_config", "kind"),
    [
        (MistralConfig(**SMALL_TEXT), "sliding_attention"),  # sliding_window=4096
        (LlamaConfig(**SMALL_TEXT, sliding_window=16), "sliding_attention"),
        (LlamaConfig(**SMALL_TEXT, attention_chunk_size=16), "chunked_attention"),
    ],
    ids=["mistral", "llama-sliding-window", "llama-attention-chunks"],
)
def test_sliding_language_models_without_layer_types_are_refused(text_config, kind):
    assert getattr(text_config, "layer_types", None) is None
    model = llava_with_text_model(text_config)
    assert "lm_stage" not in adapter_for(model).available(model)
    with pytest.raises(PruneError, match=f"its language model has {kind} layers"):
        zooprune.prune(model, "fastv", keep=4)
    assert untouched(model)


def test_partial_rotary_language_models_are_refused():
    model = llava_with_text_model(PhiConfig(**SMALL_TEXT, partial_rotary_factor=0.5))
    assert "lm_stage" not in adapter_for(model).available(model)
    with pytest.raises(PruneError, match="turns 6 of the 12 dimensions of a head"):
        zooprune.prune(model, "fastv", keep=4)
    assert untouched(model)


def test_ties_in_the_attention_scores_go_to_the_lower_index():
    from zooprune.select.fastv import top_k_ascending

    # 600 tokens (576 in LLaVA-1.5), every third scored 1, the rest 0: an unstable sort
    # orders the tied tokens otherwise on this CPU from about 100 tokens on.
    scores = torch.zeros(600)
    scores[::3] = 1
    assert top_k_ascending(scores, 150).tolist() == list(range(0, 450, 3))
    zeros = [i for i in range(600) if i % 3][:50]  # the lowest-index of the tied zeros
    assert top_k_ascending(scores, 250).tolist() == sorted([*range(0, 600, 3), *zeros])
