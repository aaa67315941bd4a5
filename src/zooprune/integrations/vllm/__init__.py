"""zooprune on vLLM: pruned variants of vLLM's own model classes, as an out-of-tree plugin.

The ``vllm.general_plugins`` entry point calls :func:`register` in every vLLM process; it
registers one pruned architecture per supported vLLM class (:data:`ARCHITECTURES`). A model
is served pruned when its HF config names the pruned architecture and carries the pruning
settings, which :func:`engine_args` writes as ``hf_overrides``::

    from vllm import LLM
    import zooprune.integrations.vllm as zv

    llm = LLM(model, **zv.engine_args(model, method="zoo", keep=64))

This module stays light (no torch, vLLM or transformers import): vLLM loads it in every
process, and the model classes load only when vLLM builds a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: vLLM architecture -> its pruned variant's name
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "ZoopruneLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "ZoopruneLlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "ZoopruneLlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "ZoopruneQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "ZoopruneQwen2_5_VLForConditionalGeneration",
}
#: the pruned variant -> where its class lives
_CLASSES = {
    "ZoopruneLlavaForConditionalGeneration": "zooprune.integrations.vllm.llava:ZoopruneLlava",
    "ZoopruneLlavaNextForConditionalGeneration": (
        "zooprune.integrations.vllm.llava:ZoopruneLlavaNext"
    ),
    "ZoopruneLlavaOnevisionForConditionalGeneration": (
        "zooprune.integrations.vllm.llava:ZoopruneLlavaOnevision"
    ),
    "ZoopruneQwen2VLForConditionalGeneration": (
        "zooprune.integrations.vllm.qwen2_vl:ZoopruneQwen2VL"
    ),
    "ZoopruneQwen2_5_VLForConditionalGeneration": (
        "zooprune.integrations.vllm.qwen2_vl:ZoopruneQwen2_5_VL"
    ),
}
#: the HF config attribute that carries the settings
SETTINGS = "zooprune"


def register() -> None:
    """Register the pruned architectures with vLLM (the entry point's target)."""
    from vllm import ModelRegistry

    for name, path in _CLASSES.items():
        ModelRegistry.register_model(name, path)


def settings(
    method: str = "zoo",
    *,
    keep: int | None = None,
    ratio: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The pruning settings as the HF config carries them, every value checked.

    Raises:
        PruneError subclasses naming what is wrong and what is accepted.
    """
    from zooprune.integrations.vllm.selection import selector_from

    chosen = {"method": method, "keep": keep, "ratio": ratio, **options}
    # Bad settings fail here, before any engine starts; so does a method that needs more
    # than features, tokens and the projector (see selector_from).
    selector_from(chosen)
    return chosen


def served_methods() -> list[str]:
    """The registered methods a pruned vLLM model serves (those needing nothing more than
    the features, the projected tokens and the projector)."""
    from zooprune.select import METHODS

    return sorted(name for name, spec in METHODS.items() if not spec.needs_for({}))


def engine_args(
    model: str | Path,
    method: str = "zoo",
    *,
    keep: int | None = None,
    ratio: float | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``LLM(model, **engine_args(model, method, keep=...))``: the ``hf_overrides`` that
    serve ``model`` pruned.

    Raises:
        UnsupportedModelError: the model's architecture has no pruned variant (names those
            that do).
        PruneError subclasses: bad settings.
    """
    return {
        "hf_overrides": {
            "architectures": [pruned_architecture(model)],
            SETTINGS: settings(method, keep=keep, ratio=ratio, **options),
        }
    }


def pruned_architecture(model: str | Path) -> str:
    """The pruned variant of ``model``'s architecture (a local folder or a hub id)."""
    from zooprune.errors import UnsupportedModelError

    architectures = _architectures(model)
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedModelError(
        f"zooprune has no pruned vLLM variant of {', '.join(architectures) or 'this model'}; "
        f"it has one for {', '.join(ARCHITECTURES)}"
    )


def _architectures(model: str | Path) -> list[str]:
    path = Path(model) / "config.json"
    if path.is_file():
        return list(json.loads(path.read_text()).get("architectures") or [])
    from transformers import AutoConfig

    return list(AutoConfig.from_pretrained(str(model)).architectures or [])
