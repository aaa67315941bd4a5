"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VL...``).

How the model lays out one image (transformers v5): the processor resizes the image to
multiples of ``patch * merge`` (``merge = spatial_merge_size``, 2 in the released models)
and cuts it into a ``h x w`` grid of patches (``image_grid_thw[i] = (t, h, w)``, ``t = 1``
for an image), ordered so that every ``merge x merge`` window of patches is consecutive.
The vision tower turns the patches into states ``[t*h*w, C]``; the patch merger
(``visual.merger``) normalises each patch state (LayerNorm in Qwen2-VL, RMSNorm in
Qwen2.5-VL), concatenates the ``merge^2`` states of a window into one ``merge^2 * C``
vector and runs a Linear -> GELU -> Linear MLP on it. Each image thus gives
``N = t*h*w / merge^2`` tokens on the merged ``(h / merge) x (w / merge)`` grid, raster
order, and the prompt holds one run of N ``<|image_pad|>`` placeholders between
``<|vision_start|>`` and ``<|vision_end|>``.

What "projector" means here: the merger is token-wise on the grouped vectors (token j's
output depends on window j's ``merge^2`` states only), so the projector the methods score
is the whole merger, norm included, on one grouped vector
(:class:`~zooprune.families.qwen.MergerProjector`), and
the projector inputs X are the tower's last hidden states grouped ``merge^2`` at a time,
``[N, merge^2 * C]``. The norm in front makes it more than a GELU MLP, so
``estimator="auto"`` runs ``jvp``; ``exact`` and ``lowrank`` are refused with a message
naming ``jvp`` and ``zo`` (as for Gemma 3, whose projector also starts with a norm).

Qwen2.5-VL's tower attends within windows and keeps its states in *window order*; the
model reorders the merger output back to raster order at the end. The adapter applies the
same inverse permutation (the argsort of ``get_vision_window_index``) to the grouped
states, so feature row j belongs to the token that fills placeholder j.

Positions (M-RoPE): the language model gives every token three position ids (temporal,
height, width); an image's tokens carry their grid coordinates, offset by the text before
them, and the text after an image continues from ``start + max(h, w) / merge``. Pruning
keeps the ORIGINAL 3-D positions of the kept tokens and of all text
(:meth:`Qwen2VLAdapter.unpruned_positions` computes them with the model's own
``get_rope_index`` on the unpruned prompt), so generation continues with exactly the
positions the unpruned model would use (each new token one past the prompt's last,
which is the unpruned maximum when the prompt ends with text, as chat prompts do).
``positions="compact"`` has no single meaning for 3-D positions and is refused; the
family's default is ``"original"``. The model receives the ``[4, B, L']`` form: a row of
contiguous 1-D positions (which the model uses for its attention mask only) above the
three M-RoPE rows; ``model.model.rope_deltas`` is set as the model's own prefill would,
relative to the shortened prompt, so a caller continuing a cache from
``handle.prepare(...)`` without position ids still gets the right positions.

Budget semantics:

- **N** = ``t*h*w / merge^2`` for ``image_grid_thw[i] = (t, h, w)``: the merged tokens;
  ``<|vision_start|>`` / ``<|vision_end|>`` are text, never scored, selected or counted,
  and always kept. N differs between images of different sizes, and so does K under
  ``ratio=``.
- One image is one crop: ``handle.selection`` gives crop 0 for every kept token and its
  ``cells`` (row, column) in the merged grid, ``grid == patch_grids[0] == (h/merge,
  w/merge)``. The processor's resize is unknown to the model, so ``boxes`` is None (as
  for LLaVA-1.5: draw over the image as processed, ``h*patch x w*patch`` pixels).

Videos: the processor cuts a video into temporal patches of ``temporal_patch_size``
frames (2 in the released models) and gives it ``video_grid_thw = (t, h, w)``; the tower
encodes it as ``t`` merged ``(h/merge) x (w/merge)`` grids, one per temporal patch, in one
run of ``t*h*w / merge^2`` ``<|video_pad|>`` placeholders (``mm_token_type_ids`` 2). A
video is one item whose N is all its grids' tokens, and each grid is one *frame* of the
record (``kind == "video"``, ``crops`` = the frame). ``video_budget="frame"`` (default)
shares the video's K evenly over its frames; ``"global"`` lets all its tokens compete.
The kept tokens keep their original 3-D positions (the temporal row included), so time
is not renumbered. Images and videos may share a call and a prompt.

Sequence surgery: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the
positions shrink together. The tower has no CLS token: ``visionzip`` is refused, naming
the methods that apply.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import VIDEO_BUDGETS, Adapter, EncodedImages, KeptImage
from zooprune.errors import PlaceholderMismatchError, PruneError
from zooprune.families import qwen

#: ``mm_token_type_ids`` of image and video placeholders (text 0), as the processor sets
_IMAGE_TYPE, _VIDEO_TYPE = 1, 2


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: one merged grid per image, 3-D M-RoPE positions kept."""

    name = "qwen2-vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    requirement = "(patch merger of `spatial_merge_size`^2 patches, M-RoPE; images and videos)"
    # No "|" here: the README's table would split the cell at it.
    tokens_per_image = (
        "t x h x w / `spatial_merge_size`^2 for `image_grid_thw` (t, h, w): the merged "
        "(h/2) x (w/2) grid of an image; the vision start / end markers excluded; a video: "
        "its t grids (frames)"
    )
    options = {"video_budget": VIDEO_BUDGETS}
    # The tower has no CLS token whose attention VisionZip could rank by.
    extras = {
        "cls_attention": "",
        # fastv's stage inside the language model (zooprune.lm_stage)
        "lm_stage": "images (a call with videos is refused), DynamicCache",
    }
    pixel_input_names = ("pixel_values", "pixel_values_videos")
    image_input_names = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    )
    position_modes = ("original",)
    position_note = (
        "M-RoPE: kept tokens keep their 3-D (temporal, height, width) positions; "
        "a compact renumbering of them is not defined"
    )
    #: the family's merger as a token-wise module on grouped vectors, built as
    #: ``merger_projector(merger, merge^2)``
    merger_projector: type[nn.Module] = qwen.MergerProjector

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def video_token_id(self, model: nn.Module) -> int:
        return model.config.video_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        unit = model.model.visual.spatial_merge_size**2
        return self.merger_projector(self.merger(model), unit)

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Encode every image, then every video, once, capturing the merger's input.

        Args:
            image_inputs: ``pixel_values [sum_i t_i h_i w_i, 3 * t_p * p * p]`` (the
                processor's patch rows) with ``image_grid_thw [I, 3]``, and / or
                ``pixel_values_videos`` with ``video_grid_thw [V, 3]``.

        Returns:
            per item: features ``[N_i, u*C]`` (grouped tower states, raster order per
            frame), projected ``[N_i, d_l]`` (the model's own tokens), grid ``(h_i/m,
            w_i/m)`` (one frame's, for a video); the images' outputs first.
        """
        kinds = [k for k in ("image", "video") if image_inputs.get(_PIXELS[k]) is not None]
        parts = [self._encode_kind(model, image_inputs, kind) for kind in kinds]
        return EncodedImages.joined(
            parts, {kind: part.encoder_output for kind, part in zip(kinds, parts, strict=True)}
        )

    def _encode_kind(self, model: nn.Module, inputs: dict[str, Any], kind: str) -> EncodedImages:
        """One modality's items: the model's own features for them and the merger's input."""
        grid_thw = inputs.get(_GRIDS[kind])
        if grid_thw is None:
            raise PruneError(f"{type(model).__name__} needs {_GRIDS[kind]} with {_PIXELS[kind]}")
        if kind == "image" and bool((grid_thw[:, 0] != 1).any()):
            raise PruneError(
                f"image_grid_thw {grid_thw.tolist()}: an image must have one temporal patch "
                "(t = 1), as the processor makes them"
            )
        visual = model.model.visual
        merge = visual.spatial_merge_size
        captured: dict[str, Tensor] = {}

        def on_merger(module: nn.Module, args: tuple, output: Tensor) -> None:
            captured["states"], captured["merged"] = args[0], output

        encode = (
            model.model.get_image_features if kind == "image" else model.model.get_video_features
        )
        hook = self.merger(model).register_forward_hook(on_merger)
        try:
            output = encode(inputs[_PIXELS[kind]], grid_thw, return_dict=True)
        finally:
            hook.remove()
        return qwen.encoded(
            captured["states"],
            captured["merged"],
            list(output.pooler_output),
            grid_thw,
            merge,
            qwen.raster_order(visual.config, merge, grid_thw),
            kind,
            engine=type(model).__name__,
            encoder_output=output,
        )

    def merger(self, model: nn.Module) -> nn.Module:
        """The module whose input is the grouped tower states and output the tokens."""
        return model.model.visual.merger

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model concatenates the per-item tuple and fills placeholders in order.
        return BaseModelOutputWithPooling(pooler_output=tuple(kept_tokens))

    def kind_encoder_output(self, encoded: EncodedImages, kind: str, kept: list[KeptImage]) -> Any:
        # Videos as images: one kept run per video, filling its placeholders in order.
        return self.encoder_output(encoded, [item.run for item in kept])

    def unpruned_positions(
        self, model: nn.Module, inputs: dict[str, Any], attention_mask: Tensor
    ) -> Tensor:
        """``[3, B, L]`` the unpruned prompt's M-RoPE positions, from the model's own rule.

        Raises:
            PruneError: without ``mm_token_type_ids`` (Qwen2.5-VL would silently fall
                back to 1-D positions, Qwen2-VL refuses).
            PlaceholderMismatchError: when they disagree with the image or the video
                placeholders.
        """
        input_ids = inputs["input_ids"]
        types = inputs.get("mm_token_type_ids")
        if types is None:
            raise PruneError(
                f"{type(model).__name__} needs mm_token_type_ids (the processor returns them) "
                "to place the image tokens' 3-D positions"
            )
        real = attention_mask.bool()
        for kind, value in (("image", _IMAGE_TYPE), ("video", _VIDEO_TYPE)):
            is_kind = input_ids == self.placeholder_id(model, kind)
            if not torch.equal((types == value) & real, is_kind & real):
                raise PlaceholderMismatchError(
                    f"mm_token_type_ids does not mark exactly the {kind} placeholders as "
                    f"{kind}s; build the inputs with the model's processor"
                )
        grids = {name: inputs.get(name) for name in ("image_grid_thw", "video_grid_thw")}
        if inputs.get("second_per_grid_ts") is not None:  # Qwen2.5-VL's video timing
            grids["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        positions, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=types, attention_mask=attention_mask, **grids
        )
        return positions

    def pruned_positions(
        self, model: nn.Module, positions: Tensor, attention_mask: Tensor
    ) -> Tensor:
        """``[4, B, L']``: contiguous 1-D positions over the three kept M-RoPE rows.

        The first row is what the text model builds its attention mask from (it must
        count real tokens contiguously, as ``generate`` does unpruned); the other three
        rotate queries and keys. Also sets ``model.model.rope_deltas`` (per prompt, the
        largest kept position + 1 - its real tokens), which the model adds to 1-D counts
        in cached steps that come without position ids.
        """
        if positions.ndim == 3 and positions.shape[0] == 4:
            positions = positions[1:]  # a caller's 4-row form: its first row is rebuilt
        elif positions.ndim == 2:
            positions = positions[None].expand(3, -1, -1)  # 1-D ids: the model's own reading
        text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        real = attention_mask.long().sum(-1)
        largest = positions.masked_fill(attention_mask[None] == 0, 0).amax(dim=(0, 2))
        model.model.rope_deltas = (largest + 1 - real).view(-1, 1)
        return torch.cat([text[None].to(positions.dtype), positions])

    def save_state(self, model: nn.Module) -> dict[str, Any]:
        """``rope_deltas`` is the one model attribute a pruned call rewrites."""
        inner = model.model.__dict__
        return {"rope_deltas": inner["rope_deltas"]} if "rope_deltas" in inner else {}

    def restore_state(self, model: nn.Module, saved: dict[str, Any]) -> None:
        inner = model.model
        if "rope_deltas" in saved:
            inner.rope_deltas = saved["rope_deltas"]
        else:
            inner.__dict__.pop("rope_deltas", None)


_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}
_GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}
