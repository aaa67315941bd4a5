"""Training recipe for the test-bed VLM (CPU, fp32, seeded, resumable).

Two phases, both counted in optimiser steps so a run is reproducible:

1. **Vision pretraining.** Only the CLIP tower plus small dense heads on its
   patch states: per-patch colour (background + colours), shape (background +
   shapes), digit of the patch's object, object-centre flag, (x, y) of the
   patch and (x, y) of its object's centre. Perception from scratch is the
   bottleneck earlier probes hit; dense labels supervise every patch. The
   phase runs ``vision_steps`` steps, or, if ``vision_shape_target`` is set,
   ends once per-patch shape accuracy (a running mean over training batches)
   reaches it. Stopping at a 0.95 shape target left the digit head weak; the
   digit head learns only on the patches that carry the digit's ink
   (``digit_labels="ink"``), and reading digits is what the long phase is for.
2. **Joint training** on all visual tokens (no token subsets at any point, so
   no pruning method is favoured). Each image carries several question/answer
   turns in one sequence (loss on the answer tokens only). At its start a
   standardisation of the tower's features is folded into the projector's first
   layer (``_standardize_projector``). The language model learns from the first
   step; the projector, frozen until then, learns from ``projector_from_step``
   (ramped up over ``late_warmup`` steps, at the lower ``lr_projector``), once
   the language model reads the image. Two things make that work. Trained from
   the start alongside a language model that could not yet read the image, the
   projector learned a large vector common to all visual tokens that buried the
   differences between them, and accuracy stayed at the answer priors. And even
   late, every update of its first layer's weights multiplies the patch states'
   large common component (which the standardisation had cancelled through the
   bias) and adds a vector shared by every token; ``projector_center`` folds
   ``-dW @ mean`` into the bias after each step, so the layer stays centred on
   the mean patch state and the collapse does not start. The tower stays frozen
   (``lr_vision`` 0); a group whose learning rate is 0 gets no gradients at all,
   and with a positive ``lr_vision`` the dense heads stay on as an auxiliary
   loss so the features keep what the questions ask about. Every evaluation
   logs ``visual_token_stats`` (the share of the tokens' second moment in their
   common mean: the collapse shows there first) and ``projector_drift``.

``evaluate`` asks one question per prompt (greedy, all or a kept subset of the
visual tokens) and reports per-family accuracy; the benchmark reuses it.

Run as ``python -m zooprune.testbed.train OUT_DIR [--vision-steps N ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from zooprune.testbed import scenes
from zooprune.testbed.model import (
    PAD_ID,
    encode_prompt,
    forward_answer_logits,
    num_image_tokens,
    pixel_values_from_images,
    prompt_text,
    save_testbed,
    testbed_config,
    testbed_processor,
    vision_features,
)
from zooprune.testbed.scenes import FAMILIES, Sample, Scene, SceneConfig, SceneObject

__all__ = [
    "AuxHeads",
    "KeepFn",
    "TrainConfig",
    "evaluate",
    "ink_mask",
    "oracle_keep",
    "patch_labels",
    "projector_drift",
    "random_keep",
    "train",
    "training_example",
    "visual_token_stats",
]

# A keep function gets the sample and its projected visual tokens [N, D] and
# returns the indices (into 0..N-1) of the tokens to keep.
KeepFn = Callable[[Sample, torch.Tensor], Sequence[int] | torch.Tensor]

_CKPT = "checkpoint.pt"
# With ``projector_center`` and a learning tower, joint steps between re-measurements of
# the tower's mean patch state.
_RECENTER_EVERY = 50
# Salt for the per-image question RNG, distinct from the generator's split seeds.
_QA_SALT = 0x7EB_0A


@dataclass(frozen=True)
class TrainConfig:
    """All knobs of a run; the defaults (the recipe of the bundled checkpoint) took 65 min
    on 2 CPU cores.

    Sizing (256 tokens, fp32, 2 cores of an AMD EPYC): a vision step of 16 images takes
    ~0.55 s, a joint step of 8 multi-turn images ~0.55 s with the tower frozen. 3000
    vision steps (33 min, tests sharing the cores for part of it) + 3500 joint steps
    (32 min, 15 evaluations of ~8 s included).
    """

    seed: int = 0
    scene: SceneConfig = scenes.DEFAULT_CONFIG
    families: tuple[str, ...] = FAMILIES
    # Keyword arguments of ``testbed_config`` (sizes).
    model: dict[str, Any] = field(default_factory=dict)
    # Phase 1: vision tower + dense heads.
    vision_steps: int = 3000
    vision_min_steps: int = 200
    vision_shape_target: float | None = None
    vision_batch: int = 16
    vision_lr: float = 1.5e-3
    # Phase 2: joint training on all visual tokens.
    joint_steps: int = 3500
    batch: int = 8
    lr_lm: float = 1e-3
    # 0 freezes the projector / the tower and dense heads (see the module docstring).
    lr_projector: float = 1e-4
    lr_vision: float = 0.0
    # Joint step from which the projector / the tower and dense heads learn (with a
    # positive learning rate): before it they are frozen, from it their learning rate
    # ramps up linearly over ``late_warmup`` steps, then follows the common schedule.
    # 0 lets them learn from the first joint step, unramped. The recipe's projector
    # waits until the language model reads the image (88% on validation in the shipped run).
    projector_from_step: int = 1250
    vision_from_step: int = 0
    late_warmup: int = 100
    # False keeps the projector's two bias vectors frozen while its weights learn: a
    # bias is added to every visual token alike, the shared vector of the collapse.
    projector_bias: bool = True
    # True keeps the projector's first layer centred while it learns: after every step
    # its bias absorbs ``-dW @ mean`` (``mean`` = the tower's mean patch state, measured
    # as for the standardisation when joint training starts), so the layer keeps
    # computing ``W (h - mean) + c``. Without it, each weight update multiplies the large
    # common component of the patch states, which the standardisation had cancelled, and
    # adds a vector shared by every visual token: the collapse. (With ``projector_bias``
    # the bias still learns from its own gradient on top of that.)
    projector_center: bool = True
    # A ``save_pretrained`` test-bed folder (e.g. the bundled weights) to start joint
    # training from: phase 1 and the standardisation are skipped (the loaded projector
    # already holds it) and the dense heads start fresh. None (the default): from scratch.
    init_from: str | None = None
    warmup: int = 60
    min_lr_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 0.5
    # Family curriculum for joint training: start with the first two families of
    # ``curriculum_order`` and add the next one every ``curriculum_steps`` steps (0, the
    # recipe's: all families from the start). Evaluation
    # always covers every family.
    curriculum_steps: int = 0
    curriculum_order: tuple[str, ...] = (
        "shape",
        "color",
        "location",
        "exists",
        "count",
        "spatial",
        "glyph",
    )
    # Question rounds over the families per image, and the cap on turns.
    rounds: int = 1
    max_turns: int = 6
    # Patches with fewer object pixels than this (but > 0) are unlabelled.
    min_object_pixels: int = 8
    # Which patches the digit head learns a digit on: "ink" (the recipe's: only patches
    # with at least ``min_ink_pixels`` pixels of the digit's ink; the object's other
    # patches are unlabelled) or "object" (every patch of a digit-carrying object, as the
    # first bundled checkpoint was trained). See ``patch_labels``.
    digit_labels: str = "ink"
    min_ink_pixels: int = 3
    # Weight of the digit head's loss among the dense losses (the others weigh 1).
    digit_weight: float = 0.5
    background_weight: float = 0.2
    eval_every: int = 250
    eval_n_per_family: int = 30
    log_every: int = 25
    checkpoint_every: int = 100
    bf16: bool = False
    threads: int = 2

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scene"] = dataclasses.asdict(self.scene)
        return d


# ------------------------------------------------------------------ labels ---


def ink_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """Bool ``[image_size, image_size]``: the pixels of ``obj``'s digit (all False without one).

    The same cells ``render_scene`` inks: font cell ``(row, col)`` of
    ``scenes.DIGIT_FONT`` covers ``scale x scale`` pixels from the glyph layout's corner.
    """
    out = np.zeros((image_size, image_size), dtype=bool)
    layout = obj.glyph_layout()
    if layout is None:
        return out
    gx0, gy0, scale = layout
    bitmap = np.array([[c == "1" for c in row] for row in scenes.DIGIT_FONT[obj.digit]])
    ink = np.kron(bitmap, np.ones((scale, scale), dtype=bool))
    out[gy0 : gy0 + ink.shape[0], gx0 : gx0 + ink.shape[1]] = ink
    return out


def patch_labels(
    scene: Scene,
    min_object_pixels: int = 8,
    digit_labels: str = "object",
    min_ink_pixels: int = 3,
) -> dict[str, np.ndarray]:
    """Dense per-patch targets for ``scene``, each of length ``N = grid**2``.

    ``color``/``shape``: 0 = background, ``1 + index`` in the config's lists,
    -100 for slivers (1 .. ``min_object_pixels - 1`` object pixels);
    ``digit``: with ``digit_labels="object"``, ``1 + digit`` or 0 (no digit) on
    object patches, -100 elsewhere; with ``"ink"``, ``1 + digit`` only on the
    patches holding at least ``min_ink_pixels`` pixels of that digit's ink, 0 on
    the patches of digitless objects, -100 elsewhere (a digit-carrying object's
    patches without enough ink included);
    ``center``: float 1.0 on the patch holding each object's centre;
    ``obj_xy``: float ``[N, 2]``, the centre of the patch's object in [-1, 1]
    (NaN off objects and on slivers);
    ``pixels``: object pixel count of the patch (for the oracle ordering).
    """
    cfg = scene.config
    p, g = cfg.patch_size, cfg.grid_size
    n = g * g
    color = np.zeros(n, np.int64)
    shape = np.zeros(n, np.int64)
    digit = np.full(n, -100, np.int64)
    center = np.zeros(n, np.float32)
    best = np.zeros(n, np.int64)
    obj_xy = np.full((n, 2), np.nan, np.float32)
    for obj in scene.objects:
        counts = obj.mask(cfg.image_size).reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
        win = counts > best
        best = np.where(win, counts, best)
        color[win] = cfg.colors.index(obj.color) + 1
        shape[win] = cfg.shapes.index(obj.shape) + 1
        digit[win] = 0 if obj.digit is None else obj.digit + 1
        obj_xy[win] = np.array([obj.cx, obj.cy]) / cfg.image_size * 2 - 1
        row = min(int(obj.cy // p), g - 1)
        col = min(int(obj.cx // p), g - 1)
        center[row * g + col] = 1.0
    sliver = (best > 0) & (best < min_object_pixels)
    color[sliver] = shape[sliver] = digit[sliver] = -100
    if digit_labels == "ink":
        digit[digit > 0] = -100
        for obj in scene.objects:
            if obj.digit is None:
                continue
            ink = ink_mask(obj, cfg.image_size).reshape(g, p, g, p).sum(axis=(1, 3)).reshape(-1)
            digit[ink >= min_ink_pixels] = obj.digit + 1
    elif digit_labels != "object":
        raise ValueError(f"digit_labels must be 'object' or 'ink', not {digit_labels!r}")
    obj_xy[sliver] = np.nan
    return {
        "color": color,
        "shape": shape,
        "digit": digit,
        "center": center,
        "obj_xy": obj_xy,
        "pixels": best,
    }


class AuxHeads(nn.Module):
    """Linear dense heads on the vision tower's patch states ``[B, N, Dv]``."""

    def __init__(self, hidden: int, n_colors: int, n_shapes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.color = nn.Linear(hidden, n_colors + 1)
        self.shape = nn.Linear(hidden, n_shapes + 1)
        self.digit = nn.Linear(hidden, 11)
        self.center = nn.Linear(hidden, 1)
        self.xy = nn.Linear(hidden, 2)
        self.obj_xy = nn.Linear(hidden, 2)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(h)
        return {
            "color": self.color(h),
            "shape": self.shape(h),
            "digit": self.digit(h),
            "center": self.center(h).squeeze(-1),
            "xy": self.xy(h),
            "obj_xy": self.obj_xy(h),
        }


def _aux_loss(
    out: dict[str, torch.Tensor],
    lab: dict[str, torch.Tensor],
    bg_weight: float,
    grid: int,
    digit_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the dense losses; also per-head object-patch accuracies."""
    w_color = torch.ones(out["color"].shape[-1])
    w_color[0] = bg_weight
    w_shape = torch.ones(out["shape"].shape[-1])
    w_shape[0] = bg_weight
    oc, os_, od = out["color"].float(), out["shape"].float(), out["digit"].float()
    l_color = F.cross_entropy(oc.flatten(0, 1), lab["color"].flatten(), weight=w_color)
    l_shape = F.cross_entropy(os_.flatten(0, 1), lab["shape"].flatten(), weight=w_shape)
    has_digit = (lab["digit"] >= 0).any()
    l_digit = (
        F.cross_entropy(od.flatten(0, 1), lab["digit"].flatten()) if has_digit else od.sum() * 0.0
    )
    # ~3 centres among 576 patches: up-weight positives so they are not ignored.
    l_center = F.binary_cross_entropy_with_logits(
        out["center"].float(), lab["center"], pos_weight=torch.tensor(20.0)
    )
    # Patch (x, y) in [-1, 1]: keeps position in the features the LM reads.
    idx = torch.arange(grid * grid)
    xy = torch.stack([idx % grid, idx // grid], -1).float() / (grid - 1) * 2 - 1
    l_xy = F.mse_loss(out["xy"].float(), xy.expand_as(out["xy"]))
    # Every patch of an object learns where the object's centre is, so the
    # location and spatial questions can be answered from any of its patches.
    on_obj = ~lab["obj_xy"].isnan().any(-1)
    l_obj_xy = (
        F.mse_loss(out["obj_xy"].float()[on_obj], lab["obj_xy"][on_obj])
        if on_obj.any()
        else out["obj_xy"].sum() * 0.0
    )
    loss = l_color + l_shape + digit_weight * l_digit + l_center + l_xy + l_obj_xy
    with torch.no_grad():
        obj = lab["shape"] > 0
        stats = {
            "aux_loss": float(loss.detach()),
            "shape_acc": float((os_.argmax(-1)[obj] == lab["shape"][obj]).float().mean()),
            "color_acc": float((oc.argmax(-1)[obj] == lab["color"][obj]).float().mean()),
        }
        dig = lab["digit"] > 0
        if dig.any():
            stats["digit_acc"] = float((od.argmax(-1)[dig] == lab["digit"][dig]).float().mean())
    return loss, stats


# -------------------------------------------------------------------- data ---


def active_families(config: TrainConfig, phase: int, step: int) -> tuple[str, ...]:
    """The families joint-training step ``step`` asks about (all of them in phase 1)."""
    if phase == 1 or config.curriculum_steps <= 0:
        return config.families
    order = [f for f in config.curriculum_order if f in config.families]
    order += [f for f in config.families if f not in order]
    return tuple(order[: 2 + step // config.curriculum_steps])


def training_example(
    index: int, config: TrainConfig, families: Sequence[str] | None = None
) -> tuple[Scene, list[tuple[str, str]], dict[str, np.ndarray]]:
    """Training image ``index``: its scene, shuffled QA turns and dense labels.

    The scene is ``make_sample("train", index)``'s; up to ``rounds`` passes over
    the families (duplicate questions skipped, at most ``max_turns``), drawn
    from an RNG seeded by ``index`` only, so any step can be regenerated.
    ``families`` (default ``config.families``) are the families asked about.
    """
    fams = tuple(config.families if families is None else families)
    first = scenes.make_sample("train", index, fams[index % len(fams)], config.scene)
    rng = np.random.default_rng([_QA_SALT, index])
    turns = [(first.question, first.answer)]
    seen = {first.question}
    for _ in range(config.rounds):
        for fi in rng.permutation(len(fams)):
            s = scenes.ask(first.scene, fams[fi], rng)
            if s is not None and s.question not in seen:
                seen.add(s.question)
                turns.append((s.question, s.answer))
    order = rng.permutation(len(turns))[: config.max_turns]
    turns = [turns[i] for i in order]
    labels = patch_labels(
        first.scene, config.min_object_pixels, config.digit_labels, config.min_ink_pixels
    )
    return first.scene, turns, labels


def _example_index(config: TrainConfig, phase: int, step: int, j: int, batch: int) -> int:
    # Disjoint index ranges per seed and phase; data is a pure function of the step.
    return config.seed * 10**10 + phase * 10**9 + step * batch + j


def _batch(
    config: TrainConfig, phase: int, step: int, vocab: dict[str, int], n_image: int
) -> dict[str, torch.Tensor]:
    bsz = config.vision_batch if phase == 1 else config.batch
    families = active_families(config, phase, step)
    ex = [
        training_example(_example_index(config, phase, step, j, bsz), config, families)
        for j in range(bsz)
    ]
    out: dict[str, torch.Tensor] = {
        "pixel_values": pixel_values_from_images(np.stack([e[0].image for e in ex])),
    }
    for k in ("color", "shape", "digit", "center", "obj_xy"):
        out[k] = torch.from_numpy(np.stack([e[2][k] for e in ex]))
    if phase == 2:
        enc = [encode_prompt(e[1], vocab, n_image) for e in ex]
        length = max(len(i) for i, _ in enc)
        ids = torch.full((bsz, length), PAD_ID, dtype=torch.long)
        tgt = torch.full((bsz, length), -100, dtype=torch.long)
        for r, (i, t) in enumerate(enc):
            ids[r, : len(i)] = torch.tensor(i)
            tgt[r, : len(t)] = torch.tensor(t)
        out["input_ids"], out["targets"] = ids, tgt
    return out


# -------------------------------------------------------------- evaluation ---


def random_keep(k: int, seed: int = 0) -> KeepFn:
    """Keep ``k`` visual tokens uniformly at random (seeded per scene)."""

    def fn(sample: Sample, feats: torch.Tensor) -> np.ndarray:
        rng = np.random.default_rng([seed, sample.scene.seed % 2**63])
        return np.sort(rng.choice(feats.shape[0], size=k, replace=False))

    return fn


def oracle_keep(k: int, seed: int = 0) -> KeepFn:
    """Keep object patches first (most object pixels first), then random background."""

    def fn(sample: Sample, feats: torch.Tensor) -> np.ndarray:
        pixels = patch_labels(sample.scene)["pixels"]
        assert pixels.shape[0] == feats.shape[0]
        rng = np.random.default_rng([seed, sample.scene.seed % 2**63])
        tie = rng.random(pixels.shape[0])
        order = np.lexsort((tie, -pixels))
        return np.sort(order[:k])

    return fn


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    split: str = "test",
    n_per_family: int = 100,
    keep_fn: KeepFn | None = None,
    families: Sequence[str] = FAMILIES,
    scene_config: SceneConfig = scenes.DEFAULT_CONFIG,
    batch_size: int = 32,
    bf16: bool = False,
    start: int = 0,
) -> dict[str, Any]:
    """Per-family exact-match accuracy, one question per prompt, greedy.

    Samples ``make_sample(split, start + i, family)`` for ``i < n_per_family``;
    inputs come from ``processor`` (the real path). ``keep_fn`` prunes visual
    tokens after the projector (kept tokens keep their position ids). Returns
    ``{"overall": macro mean, "families": {family: acc}, "n": total}``.
    """
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    samples = [
        scenes.make_sample(split, start + i, fam, scene_config)
        for fam in families
        for i in range(n_per_family)
    ]
    correct: dict[str, list[bool]] = {f: [] for f in families}
    for b0 in range(0, len(samples), batch_size):
        chunk = samples[b0 : b0 + batch_size]
        enc = [
            processor(
                images=s.scene.to_pil(), text=prompt_text([(s.question, None)]), return_tensors="pt"
            )
            for s in chunk
        ]
        length = max(e.input_ids.shape[1] for e in enc)
        ids = torch.full((len(chunk), length), PAD_ID, dtype=torch.long)
        query = torch.zeros(len(chunk), length, dtype=torch.bool)
        for r, e in enumerate(enc):
            n = e.input_ids.shape[1]
            ids[r, :n] = e.input_ids[0]
            query[r, n - 1] = True
        pv = torch.cat([e.pixel_values for e in enc])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, feats = vision_features(model, pv)
            keep = None
            if keep_fn is not None:
                keep = [
                    torch.as_tensor(np.sort(np.asarray(keep_fn(s, feats[r]))), dtype=torch.long)
                    for r, s in enumerate(chunk)
                ]
            logits = forward_answer_logits(model, ids, feats, query, keep)
        pred = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for s, p in zip(chunk, pred, strict=True):
            correct[s.family].append(p == s.answer)
    model.train(was_training)
    fam_acc = {f: float(np.mean(v)) for f, v in correct.items()}
    return {
        "overall": float(np.mean(list(fam_acc.values()))),
        "families": fam_acc,
        "n": len(samples),
    }


@torch.no_grad()
def visual_token_stats(
    model: LlavaForConditionalGeneration,
    scene_config: SceneConfig = scenes.DEFAULT_CONFIG,
    n_images: int = 32,
) -> dict[str, float]:
    """How much of the projected visual tokens is one vector they all share.

    On the first ``n_images`` validation scenes, all ``N`` tokens each: with the
    tokens ``x_i`` and their mean ``m``, ``mean_share = |m|^2 / mean_i |x_i|^2``,
    the share of the tokens' second moment in their common mean (the rest is
    their spread around it). It approaches 1 in the collapse a projector trained
    too early shows (every token ~ the same vector). ``mean_cos`` is the mean
    cosine of a token to ``m``.
    """
    was_training = model.training
    model.eval()
    images = np.stack(
        [
            scenes.make_sample("validation", i, "shape", scene_config).scene.image
            for i in range(n_images)
        ]
    )
    pixels = pixel_values_from_images(images)
    tokens = torch.cat(
        [vision_features(model, pixels[i : i + 16])[1] for i in range(0, n_images, 16)]
    )
    tokens = tokens.reshape(-1, tokens.shape[-1]).float()
    model.train(was_training)
    mean = tokens.mean(0)
    return {
        "mean_share": float(mean.pow(2).sum() / tokens.pow(2).sum(-1).mean()),
        "mean_cos": float(F.cosine_similarity(tokens, mean.expand_as(tokens), dim=-1).mean()),
    }


def projector_drift(
    model: LlavaForConditionalGeneration, reference: dict[str, torch.Tensor]
) -> float:
    """``||W - W0|| / ||W0||`` over the projector's two weight matrices (``reference`` = W0)."""
    now = model.model.multi_modal_projector.state_dict()
    keys = [k for k in reference if k.endswith("weight")]
    diff = sum(float((now[k] - reference[k]).pow(2).sum()) for k in keys)
    base = sum(float(reference[k].pow(2).sum()) for k in keys)
    return math.sqrt(diff / base)


# ---------------------------------------------------------------- training ---


@torch.no_grad()
def _standardize_projector(model: LlavaForConditionalGeneration, config: TrainConfig) -> None:
    """Fold a standardisation of the tower's features into the projector's first layer.

    After dense pretraining the patch states share a large common component and sit far
    from the scale of the text embeddings. Centring them on the mean patch state and
    dividing by their RMS spread, measured once on a fixed batch of training images,
    starts joint training from comparable scales (on its own this did not get the
    language model past the answer priors; freezing the projector after it did). The
    projector stays the standard Linear-GELU-Linear, so the saved model is a stock LLaVA.
    """
    mean, spread = _feature_stats(model, config)
    first = model.model.multi_modal_projector.linear_1
    first.weight.div_(spread)
    first.bias.sub_(first.weight @ mean)


@torch.no_grad()
def _feature_stats(
    model: LlavaForConditionalGeneration, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean patch state of the tower and the RMS spread around it (a fixed image batch)."""
    images = [
        scenes.make_sample(
            "train",
            _example_index(config, 3, 0, j, 64),
            config.families[j % len(config.families)],
            config.scene,
        )
        for j in range(64)
    ]
    pixels = pixel_values_from_images(np.stack([s.scene.image for s in images]))
    hidden = torch.cat([vision_features(model, pixels[i : i + 16])[0] for i in range(0, 64, 16)])
    hidden = hidden.reshape(-1, hidden.shape[-1]).float()
    mean = hidden.mean(0)
    spread = (hidden - mean).pow(2).sum(-1).mean().sqrt() / hidden.shape[-1] ** 0.5
    return mean, spread


def _lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _make_optimizer(
    phase: int,
    model: LlavaForConditionalGeneration,
    heads: AuxHeads,
    config: TrainConfig,
    step: int = 0,
) -> torch.optim.AdamW:
    m = model.model
    if phase == 1:
        groups = [
            {"params": [*m.vision_tower.parameters(), *heads.parameters()], "lr": config.vision_lr}
        ]
    else:
        lm = [*m.language_model.parameters(), *model.lm_head.parameters()]
        groups = [
            {"params": lm, "lr": config.lr_lm},
            {
                "params": [
                    p
                    for name, p in m.multi_modal_projector.named_parameters()
                    if config.projector_bias or not name.endswith("bias")
                ],
                "lr": config.lr_projector,
                "from_step": config.projector_from_step,
            },
            {
                "params": [*m.vision_tower.parameters(), *heads.parameters()],
                "lr": config.lr_vision,
                "from_step": config.vision_from_step,
            },
        ]
    for g in groups:
        g["base_lr"] = g["lr"]
        g.setdefault("from_step", 0)
        # A frozen group gets no gradients, so no backward pass runs through it.
        for p in g["params"]:
            p.requires_grad_(g["lr"] > 0 and step >= g["from_step"])
    if phase == 2 and not config.projector_bias:
        for name, p in m.multi_modal_projector.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(False)
    groups = [g for g in groups if g["lr"] > 0]
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=config.weight_decay, eps=1e-8)


def _group_lr(group: dict[str, Any], step: int, factor: float, late_warmup: int) -> float:
    """Learning rate of ``group`` at ``step``; unfreezes a late group when its step comes.

    A group with ``from_step > 0`` is frozen (no gradients, so AdamW skips it, weight
    decay included) before that step, and ramps up linearly over ``late_warmup``
    steps from it.
    """
    start = group["from_step"]
    if start <= 0:
        return group["base_lr"] * factor
    if step < start:
        return 0.0
    if not group["params"][0].requires_grad:
        for p in group["params"]:
            p.requires_grad_(True)
    ramp = min(1.0, (step - start + 1) / max(1, late_warmup))
    return group["base_lr"] * factor * ramp


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Write then rename, so a kill mid-save never leaves a corrupt checkpoint.
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_curve(out_dir: Path, curve: list[dict[str, Any]]) -> None:
    (out_dir / "curve.json").write_text(json.dumps(curve, indent=1))
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mins = [c["minutes"] for c in curve]
    # Below the accuracies, what the projector did: how far it moved from where joint
    # training started, and whether the visual tokens collapsed onto their mean.
    tracked = [c for c in curve if "visual" in c]
    if tracked:
        fig, (ax, low) = plt.subplots(
            2, 1, figsize=(7, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
        )
        at = [c["minutes"] for c in tracked]
        low.plot(
            at,
            [c["visual"]["mean_share"] for c in tracked],
            "-o",
            ms=3,
            label="visual tokens: share of their mean",
        )
        drift = [c.get("projector_drift") for c in tracked]
        if any(d is not None for d in drift):
            low.plot(at, [d or 0.0 for d in drift], "-s", ms=3, label="projector: |W - W0| / |W0|")
        low.set(xlabel="minutes", ylabel="fraction", ylim=(0, None))
        low.grid(alpha=0.3)
        low.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.set_xlabel("minutes")
    ax.plot(mins, [c["overall"] for c in curve], "k-o", lw=2, label="overall")
    for fam in curve[-1]["families"]:
        ax.plot(mins, [c["families"][fam] for c in curve], "-", marker=".", label=fam)
    ax.set(ylabel="held-out accuracy (all tokens)", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "curve.png", dpi=100)
    plt.close(fig)


def _step(
    phase: int,
    model: LlavaForConditionalGeneration,
    heads: AuxHeads,
    batch: dict[str, torch.Tensor],
    config: TrainConfig,
    grid: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch (no backward) and its statistics."""
    labels = {k: batch[k] for k in ("color", "shape", "digit", "center", "obj_xy")}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
        if phase == 1:
            out = model.model.vision_tower(
                batch["pixel_values"], output_hidden_states=True, return_dict=True
            )
            hidden = out.hidden_states[model.config.vision_feature_layer][:, 1:]
        else:
            hidden, proj = vision_features(model, batch["pixel_values"])
        aux, stats = _aux_loss(
            heads(hidden), labels, config.background_weight, grid, config.digit_weight
        )
        if phase == 1:
            return aux, stats
        query = batch["targets"] >= 0
        logits = forward_answer_logits(model, batch["input_ids"], proj, query)
    tgt = batch["targets"][query]
    ans = F.cross_entropy(logits.float(), tgt)
    stats["answer_loss"] = float(ans.detach())
    stats["answer_acc"] = float((logits.argmax(-1) == tgt).float().mean())
    return ans + config.aux_weight * aux, stats


def _build(config: TrainConfig) -> tuple[LlavaForConditionalGeneration, AuxHeads, LlavaProcessor]:
    torch.manual_seed(config.seed)
    mcfg = testbed_config(
        image_size=config.scene.image_size, patch_size=config.scene.patch_size, **config.model
    )
    processor = testbed_processor(mcfg, config.scene)
    model = LlavaForConditionalGeneration(mcfg)
    heads = AuxHeads(
        mcfg.vision_config.hidden_size, len(config.scene.colors), len(config.scene.shapes)
    )
    return model, heads, processor


def train(
    config: TrainConfig = TrainConfig(),
    out_dir: str | Path = "/tmp/testbed",
    progress: Callable[[dict[str, Any]], None] | None = None,
    stop_after_steps: int | None = None,
) -> Path:
    """Train (or resume from ``out_dir/checkpoint.pt``) and save the model.

    Writes ``checkpoint.pt`` every ``checkpoint_every`` steps, ``curve.json`` /
    ``curve.png`` (per-family validation accuracy vs minutes) at every
    evaluation, and the final ``save_pretrained`` folder ``out_dir/model``,
    whose path is returned. ``stop_after_steps`` ends the call (after a
    checkpoint) once that many global steps are done: for tests and for
    splitting a run across sessions. ``progress`` receives event dicts.
    """
    torch.set_num_threads(config.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    emit = progress or (lambda e: None)
    model, heads, processor = _build(config)
    vocab = processor.tokenizer.get_vocab()
    n_image = num_image_tokens(model.config)
    grid = config.scene.grid_size
    phase, step, elapsed, curve = 1, 0, 0.0, []
    # Running mean of per-patch shape accuracy in phase 1 (ends the phase).
    shape_ema, vision_steps_done = 0.0, None
    # The projector as joint training starts: what ``projector_drift`` compares with.
    projector_ref: dict[str, torch.Tensor] | None = None

    # The tower's mean patch state when ``projector_center`` is on (phase 2 only).
    feature_mean: torch.Tensor | None = None

    def projector_now() -> dict[str, torch.Tensor]:
        return {
            k: v.detach().clone() for k, v in model.model.multi_modal_projector.state_dict().items()
        }

    opt = _make_optimizer(1, model, heads, config)
    if config.init_from is not None:
        # Joint training continues a saved model: its projector already holds the
        # standardisation, so phase 1 and ``_standardize_projector`` are skipped.
        loaded = LlavaForConditionalGeneration.from_pretrained(config.init_from)
        model.load_state_dict(loaded.state_dict())
        phase, vision_steps_done = 2, 0
        projector_ref = projector_now()
        opt = _make_optimizer(2, model, heads, config)
    ckpt = out / _CKPT
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        phase, step, elapsed, curve = (state[k] for k in ("phase", "step", "elapsed", "curve"))
        shape_ema, vision_steps_done = state["shape_ema"], state["vision_steps_done"]
        projector_ref = state.get("projector_ref")
        opt = _make_optimizer(phase, model, heads, config, step)
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        emit({"event": "resumed", "phase": phase, "step": step})
    if phase == 2 and config.projector_center:
        feature_mean = _feature_stats(model, config)[0]
    (out / "train_config.json").write_text(json.dumps(config.to_json(), indent=1))
    model.train()
    heads.train()
    t0 = time.monotonic() - elapsed

    def minutes() -> float:
        return (time.monotonic() - t0) / 60

    def checkpoint() -> None:
        state = {
            "model": model.state_dict(),
            "heads": heads.state_dict(),
            "optimizer": opt.state_dict(),
            "phase": phase,
            "step": step,
            "elapsed": time.monotonic() - t0,
            "curve": curve,
            "shape_ema": shape_ema,
            "vision_steps_done": vision_steps_done,
            "projector_ref": projector_ref,
            "rng": _rng_state(),
            "config": config.to_json(),
        }
        _save_checkpoint(ckpt, state)

    def run_eval() -> None:
        res = evaluate(
            model,
            processor,
            split="validation",
            n_per_family=config.eval_n_per_family,
            families=config.families,
            scene_config=config.scene,
            bf16=config.bf16,
        )
        # Watch for the collapse of the visual tokens onto a shared vector (see the
        # module docstring) and for how far the projector moved.
        res["visual"] = visual_token_stats(model, config.scene)
        if projector_ref is not None:
            res["projector_drift"] = projector_drift(model, projector_ref)
        curve.append({"minutes": round(minutes(), 2), "phase": phase, "step": step, **res})
        _write_curve(out, curve)
        emit({"event": "eval", **curve[-1]})

    done = 0
    while phase <= 2:
        total = config.vision_steps if phase == 1 else config.joint_steps
        warmup = 30 if phase == 1 else config.warmup
        while step < total:
            if stop_after_steps is not None and done >= stop_after_steps:
                checkpoint()
                return out
            if phase == 2 and step % config.eval_every == 0:
                run_eval()
            f = _lr_factor(step, total, warmup, config.min_lr_frac)
            for g in opt.param_groups:
                g["lr"] = _group_lr(g, step, f, config.late_warmup)
            ts = time.monotonic()
            batch = _batch(config, phase, step, vocab, n_image)
            td = time.monotonic() - ts
            loss, stats = _step(phase, model, heads, batch, config, grid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Each group is clipped on its own: the dense auxiliary gradients of the
            # tower must not shrink the language model's steps.
            for group in opt.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], config.grad_clip)
            first = model.model.multi_modal_projector.linear_1
            recenter = feature_mean is not None and first.weight.grad is not None
            if recenter:
                w_before = first.weight.detach().clone()
            opt.step()
            if recenter:
                with torch.no_grad():
                    first.bias.sub_((first.weight - w_before) @ feature_mean)
            tower_learns = next(model.model.vision_tower.parameters()).grad is not None
            if feature_mean is not None and tower_learns and (step + 1) % _RECENTER_EVERY == 0:
                # The tower moved the mean patch state: fold the shift into the bias too.
                new_mean = _feature_stats(model, config)[0]
                with torch.no_grad():
                    first.bias.sub_(first.weight @ (new_mean - feature_mean))
                feature_mean = new_mean
            step += 1
            done += 1
            if phase == 1:
                shape_ema = 0.95 * shape_ema + 0.05 * stats["shape_acc"]
                stats["shape_ema"] = shape_ema
            if step % config.log_every == 0 or step == total:
                emit(
                    {
                        "event": "step",
                        "phase": phase,
                        "step": step,
                        "loss": float(loss.detach()),
                        "minutes": round(minutes(), 2),
                        "step_s": round(time.monotonic() - ts, 3),
                        "data_s": round(td, 3),
                        "lr_factor": round(f, 4),
                        **{k: round(v, 4) for k, v in stats.items()},
                    }
                )
            if step % config.checkpoint_every == 0:
                checkpoint()
            if (
                phase == 1
                and config.vision_shape_target is not None
                and step >= config.vision_min_steps
                and shape_ema >= config.vision_shape_target
            ):
                break
        if phase == 1:
            vision_steps_done = step
            emit(
                {
                    "event": "vision_done",
                    "step": step,
                    "shape_ema": round(shape_ema, 4),
                    "minutes": round(minutes(), 2),
                }
            )
            phase, step = 2, 0
            _standardize_projector(model, config)
            projector_ref = projector_now()
            if config.projector_center:
                feature_mean = _feature_stats(model, config)[0]
            opt = _make_optimizer(2, model, heads, config)
            checkpoint()
        else:
            break
    run_eval()
    checkpoint()
    model.eval()
    return save_testbed(model, processor, out / "model")


def main(argv: Sequence[str] | None = None) -> None:
    """CLI for probes: ``python -m zooprune.testbed.train OUT [--key value ...]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    kind = {
        "int": int,
        "float": float,
        "str": str,
        "bool": lambda s: s.lower() in ("1", "true"),
    }
    for f in dataclasses.fields(TrainConfig):
        base = str(f.type).removesuffix(" | None")
        if base in kind:
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind[base])
    ap.add_argument("--families", help="comma-separated subset of the families")
    ap.add_argument("--final-eval", type=int, default=0, help="questions per family after training")
    args = ap.parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    if args.families:
        overrides["families"] = tuple(args.families.split(","))
    config = TrainConfig(**overrides)
    log = open(Path(args.out_dir).parent / (Path(args.out_dir).name + ".jsonl"), "a")  # noqa: SIM115

    def progress(e: dict[str, Any]) -> None:
        print(json.dumps(e), flush=True)
        log.write(json.dumps(e) + "\n")
        log.flush()

    path = train(config, args.out_dir, progress)
    if args.final_eval:
        model = LlavaForConditionalGeneration.from_pretrained(path).eval()
        processor = testbed_processor(model.config, config.scene)
        n_img = num_image_tokens(model.config)
        k = round(n_img / 9)
        results = {}
        for name, fn in (
            ("all", None),
            (f"random{k}", random_keep(k)),
            (f"oracle{k}", oracle_keep(k)),
        ):
            t = time.monotonic()
            results[name] = evaluate(
                model,
                processor,
                "test",
                args.final_eval,
                fn,
                config.families,
                config.scene,
                bf16=config.bf16,
            )
            results[name]["seconds"] = round(time.monotonic() - t, 1)
            progress({"event": "final", "keep": name, **results[name]})
        (Path(args.out_dir) / "final_eval.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
