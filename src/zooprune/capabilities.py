"""What a Hugging Face model's language model can run beyond the pre-LLM pipeline.

A leaf module (torch only): the adapters ask it what to declare (``Adapter.available``),
the engine that runs the stage (:mod:`zooprune.lm_stage`) asks it what to refuse, and
neither imports the other for it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["capability", "language_model", "layer_kinds", "unsupported"]


def language_model(model: nn.Module) -> nn.Module | None:
    """The decoder stack the stage hooks into (``model.model.language_model``), or None."""
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", None)


def layer_kinds(config: Any) -> set[str]:
    """The attention kinds of a text config's layers, as transformers reads them to build
    the cache (``cache_utils.get_layer_types_and_kwargs``): ``layer_types`` where the
    config declares them, else ``sliding_window`` / ``attention_chunk_size`` (Mistral's
    configs declare no ``layer_types``, and every layer then slides)."""
    declared = getattr(config, "layer_types", None)
    if declared is not None:
        return set(declared)
    if getattr(config, "sliding_window", None) is not None:
        return {"sliding_attention"}
    if getattr(config, "attention_chunk_size", None) is not None:
        return {"chunked_attention"}
    return {"full_attention"}


def unsupported(text: nn.Module | None) -> str | None:
    """Why the stage cannot run in ``text``, or None when it can."""
    if text is None or not isinstance(getattr(text, "layers", None), nn.ModuleList):
        return "its language model has no decoder layer stack"
    kinds = layer_kinds(text.config)
    if kinds != {"full_attention"}:
        return f"its language model has {', '.join(sorted(kinds - {'full_attention'}))} layers"
    for layer in text.layers:
        attention = getattr(layer, "self_attn", None)
        parts = ("q_proj", "k_proj", "head_dim", "scaling")
        if (
            not hasattr(layer, "input_layernorm")
            or attention is None
            or not all(hasattr(attention, part) for part in parts)
        ):
            return "its decoder layers are not pre-norm attention layers with q/k projections"
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            return "its attention normalises queries and keys (not supported)"
    # The ranking rotates q and k over the whole head, as the decoder's shared rotary
    # embedding does unless it is partial (e.g. Phi's partial_rotary_factor).
    frequencies = getattr(getattr(text, "rotary_emb", None), "inv_freq", None)
    head_dim = text.layers[0].self_attn.head_dim
    if not isinstance(frequencies, Tensor):
        return "its language model has no shared rotary embedding"
    if 2 * frequencies.numel() != head_dim:
        return (
            f"its rotary embedding turns {2 * frequencies.numel()} of the {head_dim} "
            "dimensions of a head (partial rotary; not supported)"
        )
    return None


def capability(model: nn.Module, declared: str) -> frozenset[str]:
    """``{"lm_stage"}`` when the family declares the stage (``declared``: its adapter's
    ``extras["lm_stage"]``, empty when none) and ``model``'s language model can run it
    (:func:`unsupported`), else empty: what ``Adapter.available`` adds."""
    if declared and unsupported(language_model(model)) is None:
        return frozenset({"lm_stage"})
    return frozenset()
