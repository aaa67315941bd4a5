"""What every model adapter provides, and the sequence surgery they share.

An adapter knows, for one model family, where the projector input lives, how the visual
tokens of an image are laid out, and which placeholder token stands for them in the
prompt. Everything else (choosing tokens, shrinking the prompt) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.capabilities import capability
from zooprune.errors import PlaceholderMismatchError
from zooprune.pipeline import (
    CROP_BUDGETS,
    SEPARATOR_POLICIES,
    VIDEO_BUDGETS,
    EncodedImages,
    ImageLayout,
    KeptImage,
)

__all__ = [
    "CROP_BUDGETS",
    "SEPARATOR_POLICIES",
    "VIDEO_BUDGETS",
    "Adapter",
    "EncodedImages",
    "ImageLayout",
    "locate_images",
    "padding_side",
    "run_capturing",
    "shrink",
]


class Adapter(ABC):
    """One model family. Subclasses register themselves in ``zooprune.adapters``."""

    name: str
    model_classes: tuple[type[nn.Module], ...]
    #: one line on what in those classes is supported, for error messages and the README
    requirement: str = ""
    #: what N is for one image, in words, for the README's support matrix
    tokens_per_image: str = ""
    #: for each extra a method may need, when this family's models provide it ("" = never)
    extras: dict[str, str] = {}
    #: extras the Hugging Face engine derives from a call's prompt itself, for every
    #: family whose prompt is token ids (``"instruction"``: the input embeddings of the
    #: text tokens of the prompt that holds an image); a family that cannot sets fewer
    prompt_extras: frozenset[str] = frozenset({"instruction"})
    #: layout options ``prune()`` accepts for this family, with their allowed values
    #: (the first is the default): ``crop_budget`` (:data:`CROP_BUDGETS`),
    #: ``separators`` (:data:`SEPARATOR_POLICIES`), see :class:`ImageLayout`, and for
    #: families that prune videos ``video_budget`` (:data:`VIDEO_BUDGETS`)
    options: dict[str, tuple[str, ...]] = {}
    #: True when the grouping of encoded crops into images is spelled out only in the
    #: prompt's text tokens (Idefics3): ``encode`` then also gets ``input_ids=[B, L]``
    reads_prompt: bool = False
    #: the ``positions=`` modes ``prune()`` accepts for this family, first = default:
    #: ``"compact"`` renumbers the shortened prompt 0..L'-1 (1-D positions only),
    #: ``"original"`` keeps every token's unpruned position (any position layout)
    position_modes: tuple[str, ...] = ("compact", "original")
    #: why a mode is missing from ``position_modes``, for the error that refuses it
    position_note: str = ""

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_classes)

    def unpruned_positions(
        self, model: nn.Module, inputs: dict[str, Any], attention_mask: Tensor
    ) -> Tensor | None:
        """The position ids the unpruned model gives the call's prompt, when not 1-D.

        Called only when the caller passed no ``position_ids``.

        Args:
            inputs: the call's keyword arguments, image inputs included (read only).
            attention_mask: ``[B, L]`` the call's mask (all ones when none was given).

        Returns:
            ``[..., B, L]`` with the sequence last (e.g. M-RoPE's ``[3, B, L]``), padding
            slots free to hold anything; or None for the plain 1-D numbering of real
            tokens (every family without its own position scheme).
        """
        return None

    def pruned_positions(
        self, model: nn.Module, positions: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """The ``position_ids`` to hand the model for the shortened prompt.

        Args:
            positions: ``[..., B, L']`` the kept tokens' positions (what
                :meth:`unpruned_positions` or the caller gave, shrunk with the prompt).
            attention_mask: ``[B, L']`` the shortened prompt's mask.

        A family may reshape them into the form its forward expects and update state the
        model keeps for later cached steps. The default hands them over unchanged.
        """
        return positions

    def save_state(self, model: nn.Module) -> dict[str, Any]:
        """What :meth:`pruned_positions` may change on ``model``, as plain data (it is
        pickled and deep-copied with the model); :meth:`restore_state` puts it back
        (``PruneHandle.remove()`` does). The default changes nothing."""
        return {}

    def restore_state(self, model: nn.Module, saved: dict[str, Any]) -> None:
        """Undo what pruned calls changed, from :meth:`save_state`'s snapshot."""
        return None

    def provides(self, model: nn.Module) -> frozenset[str]:
        """What this model can give methods beyond features (e.g. ``"cls_attention"``)."""
        return frozenset()

    def available(self, model: nn.Module) -> frozenset[str]:
        """Every extra the Hugging Face engine can give methods for ``model``: what the
        adapter :meth:`provides`, the :attr:`prompt_extras`, and ``"lm_stage"`` where the
        family declares it in :attr:`extras` and the language model can run it."""
        return (
            self.provides(model)
            | self.prompt_extras
            | capability(model, self.extras.get("lm_stage", ""))
        )

    @abstractmethod
    def image_token_id(self, model: nn.Module) -> int:
        """The placeholder token id standing for one visual token in the prompt."""

    def video_token_id(self, model: nn.Module) -> int | None:
        """The placeholder of one video token, for families that prune videos (their
        ``encode`` then returns video layouts, after the images); None otherwise."""
        return None

    def placeholder_id(self, model: nn.Module, kind: str) -> int | None:
        """The placeholder token of an item of ``kind`` (``"image"`` / ``"video"``)."""
        return self.image_token_id(model) if kind == "image" else self.video_token_id(model)

    @abstractmethod
    def projector(self, model: nn.Module) -> nn.Module:
        """The token-wise projector module."""

    @abstractmethod
    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Run the vision side on ``image_inputs`` (pixel_values and friends).

        An adapter with ``reads_prompt`` takes a keyword ``input_ids`` too.
        """

    @abstractmethod
    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        """The model's encoder-output object carrying only the kept run per image.

        ``kept_tokens[i]`` is ``[S'_i, d_l]``: the kept visual tokens of image i with its
        kept separators between them, in prompt order (the tokens only where its layout's
        separators are prompt text, ``ImageLayout.text_separators``).
        """

    def encoder_outputs(self, encoded: EncodedImages, kept: list[KeptImage]) -> dict[str, Any]:
        """The model's ``mm_encoder_outputs``: per kind of item present (``"image"``,
        ``"video"``), what :meth:`kind_encoder_output` makes of that kind's kept items."""
        kinds = dict.fromkeys(item.layout.kind for item in kept)
        return {
            kind: self.kind_encoder_output(
                encoded, kind, [item for item in kept if item.layout.kind == kind]
            )
            for kind in kinds
        }

    def kind_encoder_output(self, encoded: EncodedImages, kind: str, kept: list[KeptImage]) -> Any:
        """The encoder output of one kind's items, ``kept`` in the order they were given.

        The default serves images: :meth:`encoder_output` of their kept runs. Families
        that prune videos override it for ``kind == "video"``, and those whose encoder
        output holds more rows per placeholder than the tokens (Qwen3-VL's DeepStack
        features) to keep the same rows (``kept[i].slots``) of those too.

        Raises:
            RuntimeError: for a kind the adapter has no encoder output for (its ``encode``
                returned video layouts it cannot hand back): never filed as images.
        """
        if kind != "image":
            raise RuntimeError(
                f"{type(self).__name__} encoded {kind}s but has no encoder output for them: "
                "its kind_encoder_output must handle that kind"
            )
        return self.encoder_output(encoded, [item.run for item in kept])

    #: the pixel inputs whose presence makes a call one to prune (the videos' too, for
    #: families that prune videos); a call without them runs unpruned
    pixel_input_names: tuple[str, ...] = ("pixel_values",)

    #: keyword arguments of forward/generate that belong to the vision side
    image_input_names: tuple[str, ...] = ("pixel_values",)


def run_capturing(
    run: Callable[[], Any],
    projector: nn.Module,
    attention: nn.Module | None = None,
    layer: nn.Module | None = None,
) -> tuple[Any, dict[str, Tensor]]:
    """``run()`` (the model's own image encoding) with what the adapter needs captured.

    Returns ``run()``'s output and a dict with ``"features"`` and ``"projected"`` (the
    projector's input and output on that call); when ``attention`` is given,
    ``"attention_input"`` (the hidden states entering that attention layer); when
    ``layer`` is given, ``"layer_output"`` (the hidden states that layer returns). The
    hooks are removed whatever happens, so the model is left as it was.
    """
    captured: dict[str, Tensor] = {}

    def on_projector(module: nn.Module, args: tuple, output: Tensor) -> None:
        captured["features"], captured["projected"] = args[0], output

    def on_attention(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["attention_input"] = kwargs.get("hidden_states", args[0] if args else None)

    def on_layer(module: nn.Module, args: tuple, output: Any) -> None:
        captured["layer_output"] = output[0] if isinstance(output, tuple) else output

    hooks = [projector.register_forward_hook(on_projector)]
    if attention is not None:
        hooks.append(attention.register_forward_pre_hook(on_attention, with_kwargs=True))
    if layer is not None:
        hooks.append(layer.register_forward_hook(on_layer))
    try:
        output = run()
    finally:
        for hook in hooks:
            hook.remove()
    return output, captured


def locate_images(
    input_ids: Tensor, image_token_id: int, counts: list[int], kind: str = "image"
) -> list[Tensor]:
    """Where each image's placeholder tokens are in the batch.

    The model fills placeholders with image features in row-major order, so image i owns
    the i-th run of ``counts[i]`` placeholders, which must lie in a single prompt.

    Args:
        input_ids: ``[B, L]``.
        counts: placeholders per image (its visual tokens and separators, ``S_i``), in the
            order the images were given.
        kind: ``"image"``, or ``"video"`` to locate videos among their own placeholders.

    Returns:
        per image, ``[2, S_i]`` (row, column) of its placeholders in the batch.
    """
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)
    if rows.numel() != sum(counts):
        raise PlaceholderMismatchError(
            f"the prompts hold {rows.numel()} {kind} tokens but the {len(counts)} {kind}(s) "
            f"give {sum(counts) or 'no'} placeholders ({' + '.join(map(str, counts)) or '0'}); "
            f"build the prompt with the model's processor from the same {kind}s"
        )
    located, start = [], 0
    for image, count in enumerate(counts):
        r, c = rows[start : start + count], cols[start : start + count]
        if count and bool((r != r[0]).any()):
            raise PlaceholderMismatchError(
                f"{kind} {image}'s {count} placeholder tokens are split across prompts "
                f"{sorted(set(r.tolist()))}; each prompt needs all tokens of its {kind}s"
            )
        located.append(torch.stack([r, c]))
        start += count
    return located


def padding_side(attention_mask: Tensor | None) -> str:
    """``"right"`` if some prompt is padded at the end and none at the start, else ``"left"``."""
    if attention_mask is None:
        return "left"
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    return "right" if right and not left else "left"


def shrink(
    keep: Tensor, tensors: dict[str, Tensor], pad_values: dict[str, int], side: str
) -> dict[str, Tensor]:
    """Drop the positions where ``keep`` is False, re-padding prompts to a common length.

    Args:
        keep: ``[B, L]`` bool, True for the positions that stay.
        tensors: each ``[..., B, L]`` (sequence last; e.g. Qwen's ``[3, B, L]`` positions).
        pad_values: fill value per name for the re-padded slots (default 0).
        side: ``"left"`` or ``"right"``: where the padding goes.

    Returns:
        the same names, each ``[..., B, L']`` with ``L' = max_b keep[b].sum()``.
    """
    lengths = keep.sum(dim=-1)
    new_len = int(lengths.max())
    batch = keep.shape[0]
    out = {}
    # Destination slot of each kept position: its rank among the row's kept positions,
    # shifted right by the row's padding when padding goes on the left.
    rank = keep.long().cumsum(dim=-1) - 1
    if side == "left":
        rank = rank + (new_len - lengths)[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    dest = rank[rows, cols]
    for name, t in tensors.items():
        shape = (*t.shape[:-2], batch, new_len)
        result = torch.full(shape, pad_values.get(name, 0), dtype=t.dtype, device=t.device)
        result[..., rows, dest] = t[..., rows, cols]
        out[name] = result
    return out
