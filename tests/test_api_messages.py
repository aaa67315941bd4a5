"""What the Hugging Face engine's refusals say about which item is at fault.

Messages name an item by its kind and its index among the items of that kind ("image 0",
"video 0"), the order the caller gave them in, and count Mistral 3's ``[IMG_BREAK]`` text
tokens with the placeholders where an image's run holds them. The families' tiny random
models (the testers of ``tests/adapters/test_qwen2_vl.py`` and ``test_mistral3.py``) are
saved with ``save_pretrained`` and loaded with ``from_pretrained``, once per module.
"""

import dataclasses

import pytest
import torch

import zooprune
from tests.adapters.conformance import untouched
from tests.adapters.test_mistral3 import BREAK, Mistral3Tester
from tests.adapters.test_qwen2_vl import IMAGE, VIDEO, QwenTester
from zooprune import PruneError

QWEN = QwenTester("qwen2-vl")
MISTRAL = Mistral3Tester()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """``(model, processor, pictures)`` of the tiny Qwen2-VL."""
    path = QWEN.build(tmp_path_factory.mktemp("qwen2-vl"))
    return QWEN.load(path), QWEN.processor(), QWEN.pictures()


def image_and_video(qwen) -> dict:
    """One prompt holding an image, then a video."""
    _, proc, pictures = qwen
    prompt = f"<s> user {QWEN.image_text} {QWEN.video_text} describe"
    return QWEN.video_inputs(proc, [pictures[:1]], [[QWEN.videos[0]]], [prompt])


def refusal(model, batch: dict, hidden_column: int) -> str:
    """The PruneError of a pruned forward whose mask hides ``hidden_column`` of prompt 0."""
    mask = batch["attention_mask"].clone()
    mask[0, hidden_column] = 0
    with zooprune.prune(model, "grid", keep=3) as handle:
        heard = []
        handle.observe(lambda selection, error: heard.append(error))
        with pytest.raises(PruneError) as error:
            model(**batch | {"attention_mask": mask})
    assert heard == [error.value] and untouched(model)
    return str(error.value)


def test_a_masked_video_placeholder_names_the_video(qwen):
    model = qwen[0]
    batch = image_and_video(qwen)
    videos = (batch["input_ids"][0] == VIDEO).nonzero().flatten()
    t, h, w = QWEN.videos[0]
    message = refusal(model, batch, int(videos[1]))
    assert message.startswith(
        f"video 0: 1 of its {t * h * w // 4} placeholder tokens are masked out"
    )
    # and the image before it is "image 0", not the video's number among all items
    images = (batch["input_ids"][0] == IMAGE).nonzero().flatten()
    assert refusal(model, batch, int(images[0])).startswith("image 0: 1 of its ")


def test_a_masked_separator_counts_with_the_placeholders(tmp_path):
    model = MISTRAL.load(MISTRAL.build(tmp_path))
    pictures = MISTRAL.pictures()
    batch = MISTRAL.inputs(MISTRAL.processor(), [pictures[:1]], MISTRAL.prompts[:1])
    breaks = (batch["input_ids"][0] == BREAK).nonzero().flatten()
    message = refusal(model, batch, int(breaks[0]))
    assert message.startswith("image 0: 1 of its ")
    assert "placeholder (or separator) tokens are masked out" in message


def reversed_items(encode):
    """``encode`` listing the call's items in reverse order (videos before images)."""

    def encode_reversed(*args, **kwargs):
        encoded = encode(*args, **kwargs)
        count = len(encoded.layouts)
        for field in dataclasses.fields(encoded):
            value = getattr(encoded, field.name)
            if isinstance(value, list) and len(value) == count:
                setattr(encoded, field.name, value[::-1])
        return encoded

    return encode_reversed


def test_items_meet_their_placeholders_whatever_order_the_adapter_lists_them(qwen, monkeypatch):
    model = qwen[0]
    batch = image_and_video(qwen)
    with zooprune.prune(model, "grid", keep=3) as handle:
        expected = model(**batch).logits
        kept = [(s.kind, s.positions.tolist()) for s in handle.selection.images]
        monkeypatch.setattr(handle.adapter, "encode", reversed_items(handle.adapter.encode))
        got = model(**batch).logits
        assert [(s.kind, s.positions.tolist()) for s in handle.selection.images] == kept[::-1]
    assert [kind for kind, _ in kept] == ["image", "video"]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_item_kind_without_a_placeholder_token_is_an_adapter_error(qwen, monkeypatch):
    model = qwen[0]
    with zooprune.prune(model, "grid", keep=3) as handle:
        monkeypatch.setattr(handle.adapter, "video_token_id", lambda model: None)
        with pytest.raises(RuntimeError, match=r"encoded 1 video\(s\) but names no video"):
            model(**image_and_video(qwen))


def test_observe_refuses_what_it_cannot_call(qwen):
    model = qwen[0]
    with zooprune.prune(model, "grid", keep=3) as handle:
        for callback in (42, None, "print"):
            with pytest.raises(PruneError, match="observe takes a callable"):
                handle.observe(callback)
        model(**image_and_video(qwen))  # nothing was registered: the call goes on
    assert untouched(model)
