"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``).

How the model lays out one image (transformers v5): the processor (``Qwen3VLProcessor``
with the Qwen2-VL image processor, ``patch = 16``, ``merge = spatial_merge_size = 2`` in
the released models) resizes the image to multiples of ``patch * merge`` and cuts it into
a ``h x w`` grid of patches (``image_grid_thw[i] = (t, h, w)``, ``t = 1`` for an image),
ordered so that every ``merge x merge`` window of patches is consecutive. The vision tower
(learned position embeddings resampled to the grid, 2-D rotary, full attention within
each image) keeps that order: unlike Qwen2.5-VL it has no attention windows to undo. The
patch merger (``visual.merger``) normalises each patch state with a LayerNorm, concatenates
the ``merge^2`` states of a window into one ``merge^2 * C`` vector and runs
``linear_fc1 -> GELU -> linear_fc2`` on it. Each image thus gives
``N = t*h*w / merge^2`` tokens on the merged ``(h / merge) x (w / merge)`` grid, raster
order, and the prompt holds one run of N ``<|image_pad|>`` placeholders between
``<|vision_start|>`` and ``<|vision_end|>``. There is no DeepStack: the vision model
drops Qwen3-VL's ``deepstack_merger_list``, and the merger's output is the only thing
the language model receives from an image, through its placeholders.

The language model is a hybrid: most layers are Gated DeltaNet linear attention (a
causal depthwise convolution over the last few tokens, then a gated recurrence), every
few a full-attention layer (``text_config.layer_types``); the MoE class swaps the MLPs
for sparse experts. A pruned prompt runs these layers on the shortened sequence: the
recurrence and the convolution never see the dropped placeholders. That is the unpruned
model fed the sequence without them (same embeddings, same positions), not the unpruned
model with them masked out: the linear layers have no attention mask to hide a token
with (they only zero its input, and a zeroed token still shifts the convolution window
and decays the recurrent state).

What "projector" means here: the merger is token-wise on the grouped vectors (token j's
output depends on window j's ``merge^2`` states only), so the projector the methods score
is the whole merger, norm included, on one grouped vector
(:class:`~zooprune.families.qwen.Qwen3MergerProjector`),
and the projector inputs X are the tower's last hidden states grouped ``merge^2`` at a
time, ``[N, merge^2 * C]``. The LayerNorm in front makes it more than a GELU MLP, so
``estimator="auto"`` runs ``jvp``; ``exact`` and ``lowrank`` are refused with a message
naming ``jvp`` and ``zo``.

Positions (M-RoPE, interleaved over the rotary frequencies): the model's ``get_rope_index``
gives an image's tokens the same 3-D positions as Qwen2-VL's (grid coordinates offset by
the text before them; the text after continues from ``start + max(h, w) / merge``).
Everything about positions is Qwen2-VL's and is inherited from
:class:`~zooprune.adapters.qwen2_vl.Qwen2VLAdapter`: the kept tokens and all text keep
their ORIGINAL 3-D positions, ``positions="compact"`` is refused, the model receives the
``[4, B, L']`` form (contiguous 1-D row for its masks over the three M-RoPE rows), and
``model.model.rope_deltas`` is set as the model's own prefill would and restored by
``remove()``.

Budget semantics:

- **N** = ``t*h*w / merge^2`` for ``image_grid_thw[i] = (t, h, w)``: the merged tokens;
  ``<|vision_start|>`` / ``<|vision_end|>`` are text, never scored, selected or counted,
  and always kept. N differs between images of different sizes, and so does K under
  ``ratio=``.
- One image is one crop: ``handle.selection`` gives crop 0 for every kept token and its
  ``cells`` (row, column) in the merged grid, ``grid == patch_grids[0] == (h/merge,
  w/merge)``; ``boxes`` is None (the processor's resize is unknown to the model).

Sequence surgery: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the
positions shrink together. Videos are pruned as Qwen2-VL's (one item of N = all its
frames' tokens, ``video_budget`` per frame or global, original 3-D positions kept); as in
Qwen3-VL, the processor writes each frame (temporal patch) as its own run after a text
timestamp, and the timestamps and markers always stay. The tower has no CLS token:
``visionzip`` is refused, naming the methods that apply.
"""

from __future__ import annotations

from transformers import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration

from zooprune.adapters.qwen2_vl import Qwen2VLAdapter
from zooprune.families import qwen


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen3.5 dense and MoE: Qwen2-VL's layout and positions, Qwen3's merger.

    Encoding, positions, ``rope_deltas`` and the record are Qwen2-VL's (the tower keeps
    raster order, so no window permutation applies); the projector is Qwen3's merger
    (:class:`~zooprune.families.qwen.Qwen3MergerProjector`), and its videos are pruned as
    Qwen2-VL's.
    """

    name = "qwen3.5"
    model_classes = (Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration)
    requirement = (
        "(patch merger of `spatial_merge_size`^2 patches, M-RoPE, linear/full-attention "
        "hybrid LM; images and videos)"
    )
    # The tower has no CLS token whose attention VisionZip could rank by; and FastV's stage
    # inside the language model is not declared: it runs on plain full-attention decoders,
    # not on linear-attention layers.
    extras = {"cls_attention": ""}
    merger_projector = qwen.Qwen3MergerProjector
