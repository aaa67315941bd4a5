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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zooprune.integrations.vllm.cpu_runner import enable_video_pruning

_MODULE = "zooprune.integrations.vllm"


@dataclass(frozen=True)
class Variant:
    """What a pruned vLLM variant is and serves, declared here (no vLLM import needed to
    check settings against it).

    Attributes:
        name: the architecture name vLLM registers it under.
        path: ``module:Class`` within this package.
        layout: the layout options it honours, each with the values it takes (None: every
            value the option has).
        positions: the one position mode vLLM gives the family's prompts: ``"compact"``
            (1-D positions, numbered contiguously) or ``"original"`` (M-RoPE).
        why: for each layout option it takes only some values of, the reason (a refusal
            gives it).
    """

    name: str
    path: str
    layout: dict[str, tuple[str, ...] | None] = field(default_factory=dict)
    positions: str = "compact"
    why: dict[str, str] = field(default_factory=dict)


#: vLLM writes an image's placeholders into the prompt before it encodes the image
_COUNTED_FIRST = "vLLM counts an image's placeholders before it encodes the image"
#: AnyRes on vLLM: every crop budget, and only the newline policy whose placeholder count
#: vLLM can know before encoding ("all")
_ANYRES = {"crop_budget": None, "separators": ("all",)}
#: why a family whose rows end in separators (AnyRes, Mistral 3) keeps them all on vLLM
_ROWS_WHY = {
    "separators": f"{_COUNTED_FIRST}, and the row separators 'nonempty' keeps depend on "
    "the kept tokens"
}
#: Idefics3 / SmolVLM on vLLM: each crop's run sits between its own text markers, so each
#: crop's count must be known before encoding ("split")
_CROPS_BETWEEN_MARKERS = {"crop_budget": ("split",)}
_CROPS_BETWEEN_MARKERS_WHY = {
    "crop_budget": f"{_COUNTED_FIRST}, each crop's run between its own text markers, and "
    "how many tokens a 'global' selection keeps in each crop depends on the kept tokens"
}
#: Qwen2-VL, Qwen2.5-VL and OneVision write a video as one run: both video budgets
_ONE_RUN_VIDEOS = {"video_budget": None}
#: Qwen3-VL / Qwen3.5 write each frame as its own run between its timestamp and markers
_RUN_PER_FRAME = {"video_budget": ("frame",)}
_RUN_PER_FRAME_WHY = {
    "video_budget": "vLLM counts a video's placeholders before it encodes the video, each "
    "frame's run between its own timestamp and markers, and how many tokens a 'global' "
    "selection keeps in each frame depends on the kept tokens"
}
#: HF architecture -> its pruned variant
VARIANTS: dict[str, Variant] = {
    "LlavaForConditionalGeneration": Variant(
        "ZoopruneLlavaForConditionalGeneration", "llava:ZoopruneLlava"
    ),
    "LlavaNextForConditionalGeneration": Variant(
        "ZoopruneLlavaNextForConditionalGeneration",
        "llava:ZoopruneLlavaNext",
        _ANYRES,
        why=_ROWS_WHY,
    ),
    "LlavaOnevisionForConditionalGeneration": Variant(
        "ZoopruneLlavaOnevisionForConditionalGeneration",
        "llava:ZoopruneLlavaOnevision",
        {**_ANYRES, **_ONE_RUN_VIDEOS},
        why=_ROWS_WHY,
    ),
    "Gemma3ForConditionalGeneration": Variant(
        "ZoopruneGemma3ForConditionalGeneration", "gemma:ZoopruneGemma3"
    ),
    "Gemma4ForConditionalGeneration": Variant(
        "ZoopruneGemma4ForConditionalGeneration", "gemma:ZoopruneGemma4"
    ),
    "Mistral3ForConditionalGeneration": Variant(
        "ZoopruneMistral3ForConditionalGeneration",
        "mistral3:ZoopruneMistral3",
        {"separators": ("all",)},
        why=_ROWS_WHY,
    ),
    "InternVLForConditionalGeneration": Variant(
        "ZoopruneInternVLForConditionalGeneration",
        "internvl:ZoopruneInternVL",
        {"crop_budget": None},
    ),
    "Idefics3ForConditionalGeneration": Variant(
        "ZoopruneIdefics3ForConditionalGeneration",
        "idefics3:ZoopruneIdefics3",
        _CROPS_BETWEEN_MARKERS,
        why=_CROPS_BETWEEN_MARKERS_WHY,
    ),
    "SmolVLMForConditionalGeneration": Variant(
        "ZoopruneSmolVLMForConditionalGeneration",
        "idefics3:ZoopruneSmolVLM",
        _CROPS_BETWEEN_MARKERS,
        why=_CROPS_BETWEEN_MARKERS_WHY,
    ),
    "Qwen2VLForConditionalGeneration": Variant(
        "ZoopruneQwen2VLForConditionalGeneration",
        "qwen:ZoopruneQwen2VL",
        _ONE_RUN_VIDEOS,
        positions="original",
    ),
    "Qwen2_5_VLForConditionalGeneration": Variant(
        "ZoopruneQwen2_5_VLForConditionalGeneration",
        "qwen:ZoopruneQwen2_5_VL",
        _ONE_RUN_VIDEOS,
        positions="original",
    ),
    "Qwen3VLForConditionalGeneration": Variant(
        "ZoopruneQwen3VLForConditionalGeneration",
        "qwen:ZoopruneQwen3VL",
        _RUN_PER_FRAME,
        positions="original",
        why=_RUN_PER_FRAME_WHY,
    ),
    "Qwen3VLMoeForConditionalGeneration": Variant(
        "ZoopruneQwen3VLMoeForConditionalGeneration",
        "qwen:ZoopruneQwen3VLMoe",
        _RUN_PER_FRAME,
        positions="original",
        why=_RUN_PER_FRAME_WHY,
    ),
    "Qwen3_5ForConditionalGeneration": Variant(
        "ZoopruneQwen3_5ForConditionalGeneration",
        "qwen:ZoopruneQwen3_5",
        _RUN_PER_FRAME,
        positions="original",
        why=_RUN_PER_FRAME_WHY,
    ),
    "Qwen3_5MoeForConditionalGeneration": Variant(
        "ZoopruneQwen3_5MoeForConditionalGeneration",
        "qwen:ZoopruneQwen3_5Moe",
        _RUN_PER_FRAME,
        positions="original",
        why=_RUN_PER_FRAME_WHY,
    ),
}
#: HF architecture -> its pruned variant's name
ARCHITECTURES = {architecture: variant.name for architecture, variant in VARIANTS.items()}


def architecture_served(config: Any) -> str:
    """The HF architecture a pruned variant's HF ``config`` is served as (the one whose
    variant it names)."""
    named = set(getattr(config, "architectures", None) or ())
    for architecture, variant in VARIANTS.items():
        if variant.name in named:
            return architecture
    raise ValueError(f"no pruned variant among the architectures {sorted(named)}")


#: what stock vLLM 0.32 needs changed in a transformers 5 config before it serves the model
#: (see ``shared/design/vllm-notes.md``): Qwen3-VL-MoE's config lacks ``norm_topk_prob``,
#: which transformers applies always (its experts' weights are renormalised)
CONFIG_FIXES: dict[str, dict[str, Any]] = {
    "Qwen3VLMoeForConditionalGeneration": {"text_config": {"norm_topk_prob": True}},
}


def config_fixes(architecture: str, model: str | Path) -> dict[str, Any]:
    """The ``hf_overrides`` stock vLLM needs for ``model``'s config: :data:`CONFIG_FIXES`,
    and for Gemma 4 the ``default_output_length`` transformers 5's vision config lacks
    (vLLM reads each image's soft-token budget from it): the image processor's
    ``max_soft_tokens``, saved beside the model."""
    fixes = dict(CONFIG_FIXES.get(architecture, {}))
    if architecture == "Gemma4ForConditionalGeneration":
        vision = json.loads((Path(model) / "config.json").read_text()).get("vision_config", {})
        if "default_output_length" not in vision:
            fixes["vision_config"] = {"default_output_length": _max_soft_tokens(Path(model))}
    return fixes


def _max_soft_tokens(folder: Path) -> int:
    """The image processor's ``max_soft_tokens`` in a saved model folder (280, Gemma 4's
    default, where none is saved)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = folder / name
        if path.is_file():
            saved = json.loads(path.read_text())
            found = saved.get("image_processor", saved).get("max_soft_tokens")
            if found is not None:
                return int(found)
    return 280


#: the HF config attribute that carries the settings
SETTINGS = "zooprune"


def register() -> None:
    """Register the pruned architectures with vLLM (the entry point's target), and let
    vLLM's own video pruning run on a CPU (:mod:`.cpu_runner`)."""
    from vllm import ModelRegistry

    for variant in VARIANTS.values():
        ModelRegistry.register_model(variant.name, f"{_MODULE}.{variant.path}")
    enable_video_pruning()


def settings(
    method: str = "zoo",
    *,
    keep: int | None = None,
    ratio: float | None = None,
    architecture: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The pruning settings as the HF config carries them, every value checked, for the
    variant of ``architecture`` (its layout options and position mode) or, without one,
    as any variant checks them (no layout option, no position mode).

    Raises:
        PruneError subclasses naming what is wrong and what is accepted.
    """
    from zooprune.integrations.vllm.selection import check_settings

    chosen = {"method": method, "keep": keep, "ratio": ratio, **options}
    if chosen.get("positions", "") is None:  # the family's own mode: nothing to carry
        del chosen["positions"]
    # Bad settings fail here, before any engine starts; so does a method that needs more
    # than features, tokens and the projector (see selection.selector_from).
    check_settings(chosen, VARIANTS.get(architecture) if architecture else None)
    return chosen


def served_methods() -> list[str]:
    """The registered methods a pruned vLLM model serves (those needing nothing more than
    the features, the projected tokens and the projector)."""
    from zooprune.select import METHODS

    return sorted(name for name, spec in METHODS.items() if not spec.needs_for({}))


def served_table() -> str:
    """The vLLM table of docs/vllm.md, in Markdown, from :data:`VARIANTS`: each architecture served
    pruned, its variant, the layout options it takes (with the reason where it takes only
    some values) and its position mode."""
    from zooprune.settings import LAYOUT_OPTIONS

    lines = [
        "| architecture | served as | layout options | positions |",
        "|---|---|---|---|",
    ]
    notes: list[str] = []
    for architecture, variant in VARIANTS.items():
        options = []
        for name, values in variant.layout.items():
            cell = f"`{name}`: {', '.join(values or LAYOUT_OPTIONS[name])}"
            if name in variant.why:
                if variant.why[name] not in notes:
                    notes.append(variant.why[name])
                cell += f" ({notes.index(variant.why[name]) + 1})"
            options.append(cell)
        lines.append(
            f"| `{architecture}` | `{variant.name}` | {'; '.join(options) or '–'} | "
            f"{variant.positions} |"
        )
    lines += ["", *[f"({i}) {note}" for i, note in enumerate(notes, 1)]]
    return "\n".join(lines) + "\n"


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
    architecture = served_architecture(model)
    chosen = settings(method, keep=keep, ratio=ratio, architecture=architecture, **options)
    return {
        "hf_overrides": {
            **config_fixes(architecture, model),
            "architectures": [ARCHITECTURES[architecture]],
            SETTINGS: chosen,
        }
    }


def pruned_architecture(model: str | Path) -> str:
    """The pruned variant of ``model``'s architecture (a local folder or a hub id)."""
    return ARCHITECTURES[served_architecture(model)]


def served_architecture(model: str | Path) -> str:
    """The architecture of ``model`` that has a pruned variant.

    Raises:
        UnsupportedModelError: none has (naming those that do).
    """
    from zooprune.errors import UnsupportedModelError

    architectures = _architectures(model)
    for name in architectures:
        if name in ARCHITECTURES:
            return name
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
