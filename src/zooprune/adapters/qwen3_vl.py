"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``).

How the model lays out one image (transformers v5): the processor (``Qwen3VLProcessor``
with the Qwen2-VL image processor; ``patch = 16``, ``merge = spatial_merge_size = 2`` in
the released models) resizes the image to multiples of ``patch * merge`` and cuts it into
a ``h x w`` grid of patches (``image_grid_thw[i] = (t, h, w)``, ``t = 1`` for an image),
ordered so that every ``merge x merge`` window of patches is consecutive. The vision tower
(learned position embeddings resampled to the grid, 2-D rotary, full attention within
each image) keeps that order: it has no attention windows to undo. The patch merger
(``visual.merger``) normalises each patch state with a LayerNorm, concatenates the
``merge^2`` states of a window into one ``merge^2 * C`` vector and runs
``linear_fc1 -> GELU -> linear_fc2`` on it. Each image thus gives ``N = t*h*w / merge^2``
tokens on the merged ``(h / merge) x (w / merge)`` grid, raster order, and the prompt
holds one run of N ``<|image_pad|>`` placeholders between ``<|vision_start|>`` and
``<|vision_end|>``.

DeepStack: for each tower layer in ``vision_config.deepstack_visual_indexes`` (three in
the released models), that layer's states go through a merger of their own
(``visual.deepstack_merger_list[k]``: the same window grouping, a LayerNorm over the whole
grouped vector, the same MLP shape), giving a second ``[N, d_l]`` feature per token per
level, in the same raster order. The language model adds level k's row j to the hidden
state at the image's j-th placeholder (``visual_pos_masks``) after decoder layer k. One
visual token is thus one row of the merger's output *and* the same row of every
DeepStack level.

What "projector" means here: the methods score the main merger, norm included, on one
grouped vector (:class:`~zooprune.families.qwen.Qwen3MergerProjector`: Qwen3.5 has
the very same merger); the projector inputs X are the tower's last hidden states grouped
``merge^2`` at a time, ``[N, merge^2 * C]``, and its outputs are what fills the
placeholders. The DeepStack mergers are not scored: they read other states (earlier
layers), and what they give is added to the same tokens deeper in the language model, so
they follow the choice instead: pruning keeps, at every level, exactly the rows of the
kept tokens (a kept token brings all of its levels, a dropped token none), and the
language model adds them at the kept placeholders. A method that builds its tokens
(``pool``) fills the slot of a cell with its pooled token and that cell's own DeepStack
rows (not pooled ones). The LayerNorm in front makes the merger more than a GELU MLP, so
``estimator="auto"`` runs ``jvp``; ``exact`` and ``lowrank`` are refused with a message
naming ``jvp`` and ``zo``.

Positions (M-RoPE, interleaved over the rotary frequencies): the model's
``get_rope_index`` gives an image's tokens the same 3-D positions as Qwen2-VL's (grid
coordinates offset by the text before them; the text after continues from
``start + max(h, w) / merge``). Everything about positions is Qwen2-VL's and is inherited
from :class:`~zooprune.adapters.qwen2_vl.Qwen2VLAdapter`: the kept tokens and all text
keep their ORIGINAL 3-D positions, ``positions="compact"`` is refused, the model receives
the ``[4, B, L']`` form (a contiguous 1-D row for its masks over the three M-RoPE rows),
and ``model.model.rope_deltas`` is set as the model's own prefill would set it for the
shortened prompt, and restored by ``remove()``.

Budget semantics:

- **N** = ``t*h*w / merge^2`` for ``image_grid_thw[i] = (t, h, w)``: the merged tokens;
  ``<|vision_start|>`` / ``<|vision_end|>`` are text, never scored, selected or counted,
  and always kept. N differs between images of different sizes, and so does K under
  ``ratio=``. The DeepStack rows are not tokens of their own: they go with their token
  and count nothing.
- One image is one crop: ``handle.selection`` gives crop 0 for every kept token and its
  ``cells`` (row, column) in the merged grid, ``grid == patch_grids[0] == (h/merge,
  w/merge)``; ``boxes`` is None (the processor's resize is unknown to the model: draw over
  the image as processed, ``h*patch x w*patch`` pixels).

Sequence surgery: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the
positions shrink together.

Videos are pruned as Qwen2-VL's (one item of N = all its frames' tokens, ``video_budget``
per frame or global, original 3-D positions kept), with the DeepStack rows of the video's
kept tokens kept along. Qwen3-VL's processor writes each frame (temporal patch) as its own
run, ``<t seconds><|vision_start|><|video_pad|>...<|vision_end|>``: the timestamps and
markers are text and always stay, and the video's placeholders, found in order across
those runs, are its frames' tokens frame after frame.

The tower has no CLS token: ``visionzip`` is refused, naming the methods that apply; so
is ``fastv``, which drops tokens inside the language model: Qwen3's attention normalises
queries and keys (which that stage does not handle), and DeepStack adds rows at every
visual position after the first decoder layers, which a prompt shortened between layers
would no longer match.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from zooprune.adapters.base import EncodedImages
from zooprune.adapters.qwen3_5 import Qwen3_5Adapter
from zooprune.pipeline import KeptImage


class Qwen3VLAdapter(Qwen3_5Adapter):
    """Qwen3-VL dense and MoE: Qwen3.5's adapter (Qwen2-VL's layout and positions, Qwen3's
    merger) with the DeepStack rows kept along.

    Encoding, positions, ``rope_deltas`` and the record are Qwen2-VL's (the tower keeps
    raster order, so no window permutation applies); the projector is Qwen3's merger, and
    the encoder output carries the kept rows of every DeepStack level with the tokens.
    """

    name = "qwen3-vl"
    model_classes = (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
    requirement = (
        "(patch merger of `spatial_merge_size`^2 patches, DeepStack features, M-RoPE; "
        "images and videos)"
    )
    extras = {
        # The tower has no CLS token whose attention VisionZip could rank by.
        "cls_attention": "",
        # No stage inside the language model (fastv): its attention normalises queries
        # and keys, and DeepStack adds rows at every visual position after the first
        # layers, which tokens dropped between layers would no longer match.
        "lm_stage": "",
    }
    image_input_names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

    def kind_encoder_output(self, encoded: EncodedImages, kind: str, kept: list[KeptImage]) -> Any:
        """One kind's kept runs and, at every DeepStack level, the same rows.

        A run's slots index the item's rows as the model made them (one row per
        placeholder), so level k of item i keeps ``deepstack_features[k][i][slots]``.
        """
        own = encoded.encoder_output[kind]
        levels = [
            tuple(rows[item.slots.to(rows.device)] for rows, item in zip(level, kept, strict=True))
            for level in own.deepstack_features
        ]
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(item.run for item in kept), deepstack_features=levels
        )
