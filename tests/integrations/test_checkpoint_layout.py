"""The hub-layout copy vLLM's stock classes read: every tower key gains its
``vision_model`` level, nothing else changes, and transformers loads the copy back to the
same weights (the hub's LLaVA checkpoints are in this layout)."""

import torch
from safetensors import safe_open
from transformers import LlavaForConditionalGeneration

from zooprune.integrations.vllm.checkpoint import hub_key, hub_layout_copy, in_hub_layout
from zooprune.tiny import save_tiny_llava


def keys(folder):
    with safe_open(folder / "model.safetensors", "pt") as file:
        return set(file.keys())


def test_the_copy_nests_the_tower_and_loads_back_to_the_same_weights(tmp_path):
    source = save_tiny_llava(tmp_path / "saved")
    copy = hub_layout_copy(source, tmp_path / "hub")
    before, after = keys(source), keys(copy)
    assert any("vision_tower." in k and ".vision_model." not in k for k in before)
    assert after == {hub_key(k) for k in before} and len(after) == len(before)
    assert all(".vision_model." in k for k in after if "vision_tower." in k)
    assert keys(source) == before  # the source folder is left as it was
    assert not in_hub_layout(source) and in_hub_layout(copy)
    assert hub_key("model.vision_tower.vision_model.x") == "model.vision_tower.vision_model.x"
    original = LlavaForConditionalGeneration.from_pretrained(source).state_dict()
    loaded = LlavaForConditionalGeneration.from_pretrained(copy).state_dict()
    assert original.keys() == loaded.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
