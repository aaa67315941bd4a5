"""Seeded synthetic scenes with single-word question/answer pairs.

Each scene is a small RGB image (default 144x144 px, i.e. a 16x16 grid of 9 px
patches) showing 1-4 flat-coloured shapes on a dark, noisy, cluttered
background. Most patches are background; only the few patches covering objects
carry the answer, which is what makes the task useful for measuring how
visual-token pruning affects accuracy.

Design rules (from earlier probes with a tiny from-scratch model):

* every object in a scene has a distinct colour, and questions refer to an
  object by a single attribute that is unique in the scene (a small LM cannot
  bind conjunctions such as "red square");
* all words are lowercase and answers are one word;
* a question ends with the word naming its (last) object, with no ``"?"``
  after it: the answer is predicted right at that word, so a from-scratch LM
  finds the object in one attention step instead of first having to carry the
  name forward to a closing token (with a closing ``"?"`` a perfect-feature
  probe of the LM stayed at the answer priors on most families);
* everything is drawn with numpy masks and a built-in 3x5 bitmap font, so the
  pixels are identical on every machine.

Coordinates are in pixels, ``x`` to the right and ``y`` downwards, with pixel
``(x, y)`` covering ``[x, x + 1) x [y, y + 1)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TypeVar

import numpy as np
from PIL import Image

__all__ = [
    "COLOR_RGB",
    "DEFAULT_CONFIG",
    "DIGIT_FONT",
    "FAMILIES",
    "GLYPH_SHAPES",
    "LOCATIONS",
    "NEGATIVE_SUBTYPES",
    "NUMBER_WORDS",
    "SHAPES",
    "SPLIT_SEEDS",
    "Sample",
    "Scene",
    "SceneConfig",
    "SceneObject",
    "adversarial_negative",
    "ask",
    "attribute_prior",
    "iter_samples",
    "make_sample",
    "make_scene",
    "plural",
    "popular_negative",
    "render_scene",
    "vocabulary",
]

# Saturated colours, chosen far apart in RGB and far from the dark background
# and the grey clutter.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Only shapes with a large solid interior can hold a readable digit.
GLYPH_SHAPES: tuple[str, ...] = ("circle", "square")
FAMILIES: tuple[str, ...] = (
    "color",
    "shape",
    "count",
    "exists",
    "spatial",
    "location",
    "glyph",
)
NEGATIVE_SUBTYPES: tuple[str, ...] = ("random", "popular", "adversarial")
LOCATIONS: tuple[str, ...] = ("topleft", "topright", "bottomleft", "bottomright")
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
# Fixed, distinct entropy words: SeedSequence([split_seed, index]) then gives
# statistically independent streams per split.
SPLIT_SEEDS: dict[str, int] = {
    "train": 0x5EED_0001,
    "validation": 0x5EED_0002,
    "test": 0x5EED_0003,
}

# 3 columns x 5 rows, "1" = ink. Every pair of digits differs in >= 1 cell.
DIGIT_FONT: dict[int, tuple[str, ...]] = {
    0: ("111", "101", "101", "101", "111"),
    1: ("010", "110", "010", "010", "111"),
    2: ("111", "001", "111", "100", "111"),
    3: ("111", "001", "111", "001", "111"),
    4: ("101", "101", "111", "001", "001"),
    5: ("111", "100", "111", "001", "111"),
    6: ("111", "100", "111", "101", "111"),
    7: ("111", "001", "010", "010", "010"),
    8: ("111", "101", "111", "101", "111"),
    9: ("111", "101", "111", "001", "111"),
}
_FONT_W, _FONT_H = 3, 5
_T = TypeVar("_T")
_FONT_BITMAPS: dict[int, np.ndarray] = {
    d: np.array([[c == "1" for c in row] for row in rows], dtype=bool)
    for d, rows in DIGIT_FONT.items()
}

_QUESTION_WORDS: tuple[str, ...] = (
    "a",
    "above",
    "color",
    "digit",
    "how",
    "is",
    "left",
    "many",
    "objects",
    "of",
    "on",
    "shape",
    "the",
    "there",
    "what",
    "where",
)


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the scene generator. All lengths are in pixels.

    ``image_size`` must be a multiple of ``patch_size``; the token grid is
    ``image_size // patch_size`` on each side (144/6 -> 24, 144/9 -> 16).
    Margins for the spatial and location families are given in patches so that
    they scale with the tokenisation.
    """

    image_size: int = 144
    patch_size: int = 9
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLOR_RGB)
    # Objects cover ~3-4.5 patches a side (~10% of the 256 tokens each). With
    # 14-20 px objects (~17 object tokens of 256) the from-scratch LM learned
    # the lookup far too slowly on 2 CPU cores, even from perfect features.
    min_size: int = 28
    max_size: int = 40
    min_objects: int = 1
    max_objects: int = 4
    # Minimum empty gap between object bounding boxes.
    object_gap: int = 4
    # Minimum distance from any object to the image border.
    border: int = 2
    noise_sigma: float = 6.0
    min_clutter: int = 3
    max_clutter: int = 8
    # Minimum gap between clutter and object bounding boxes.
    clutter_gap: int = 2
    # Probability that a scene carries glyphs at all, then per object.
    glyph_prob: float = 0.5
    glyph_object_prob: float = 0.6
    glyph_min_size: int = 16
    # Attribute prior: weight of the i-th listed value is 1 - skew * i / (n - 1),
    # so earlier-listed colours/shapes are more frequent. This is what makes
    # "popular" exists-negatives differ from "random" ones. 0 means uniform.
    prior_skew: float = 0.5
    # Spatial questions need |centre difference| > this many patches.
    spatial_margin_patches: float = 1.0
    # Location questions need the centre > this many patches from both midlines.
    location_margin_patches: float = 1.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        for name, values, known in (
            ("shapes", self.shapes, SHAPES),
            ("colors", self.colors, tuple(COLOR_RGB)),
        ):
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be non-empty and unique")
            unknown = set(values) - set(known)
            if unknown:
                raise ValueError(f"unknown {name}: {sorted(unknown)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        # Colours are unique per scene, and count answers are number words.
        if self.max_objects > min(len(self.colors), len(NUMBER_WORDS) - 1):
            raise ValueError("max_objects exceeds the number of colours")
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        if self.max_size + 2 * self.border > self.image_size:
            raise ValueError("objects do not fit in the image")
        if not 0 <= self.min_clutter <= self.max_clutter:
            raise ValueError("need 0 <= min_clutter <= max_clutter")
        if not 0.0 <= self.prior_skew < 1.0:
            raise ValueError("prior_skew must be in [0, 1)")

    @property
    def grid_size(self) -> int:
        """Tokens per side of the patch grid."""
        return self.image_size // self.patch_size

    @property
    def glyph_shapes(self) -> tuple[str, ...]:
        """Configured shapes that can carry a digit."""
        return tuple(s for s in self.shapes if s in GLYPH_SHAPES)


DEFAULT_CONFIG = SceneConfig()


@dataclass(frozen=True)
class SceneObject:
    """One flat-coloured shape.

    ``(cx, cy)`` is the centre in pixels and ``size`` the side of its square
    bounding box in pixels. Drawing snaps the box to the pixel grid (see
    :meth:`bbox`); generated objects always have ``cx - size / 2`` integral.
    ``digit`` (0-9) is drawn inside the object when not ``None``.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: int
    digit: int | None = None

    def bbox(self) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)``, end-exclusive, side ``size``."""
        x0 = math.floor(self.cx - self.size / 2 + 0.5)
        y0 = math.floor(self.cy - self.size / 2 + 0.5)
        return x0, y0, x0 + self.size, y0 + self.size

    def local_mask(self) -> np.ndarray:
        """Bool ``[size, size]`` mask of the shape inside :meth:`bbox`."""
        return _shape_mask(self.shape, self.size).copy()

    def mask(self, image_size: int) -> np.ndarray:
        """Bool ``[image_size, image_size]`` mask of the pixels of this shape."""
        out = np.zeros((image_size, image_size), dtype=bool)
        x0, y0, x1, y1 = self.bbox()
        local = _shape_mask(self.shape, self.size)
        # Clip so hand-built objects partly outside the image still work.
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, image_size), min(y1, image_size)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0:cy1, cx0:cx1] = local[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        return out

    def glyph_layout(self) -> tuple[int, int, int] | None:
        """Where the digit is drawn: ``(gx0, gy0, scale)`` or ``None``.

        The glyph occupies ``[gx0, gx0 + 3 * scale) x [gy0, gy0 + 5 * scale)``;
        font cell ``(row, col)`` covers ``scale x scale`` pixels. ``scale`` is
        the largest integer for which the glyph fits inside the shape with a
        1 px rim. Raises ``ValueError`` if the object cannot hold a digit.
        """
        if self.digit is None:
            return None
        if self.shape not in GLYPH_SHAPES:
            raise ValueError(f"a {self.shape} cannot carry a digit")
        half = self.size / 2
        if self.shape == "square":
            scale = math.floor((half - 1) / (_FONT_H / 2))
        else:
            # Glyph corners must stay inside the circle.
            corner = math.hypot(_FONT_W / 2, _FONT_H / 2)
            scale = math.floor((half - 1) / corner)
        if scale < 1:
            raise ValueError(f"object of size {self.size} is too small for a digit")
        x0, y0, _, _ = self.bbox()
        gx0 = x0 + (self.size - _FONT_W * scale) // 2
        gy0 = y0 + (self.size - _FONT_H * scale) // 2
        return gx0, gy0, scale


@dataclass(frozen=True)
class Scene:
    """A rendered scene and its ground truth.

    ``image`` is a read-only ``uint8`` array ``[H, W, 3]`` (RGB); it is left
    out of equality/hashing, which compare ``objects``, ``seed`` and
    ``config``.
    """

    image: np.ndarray = field(compare=False, repr=False)
    objects: tuple[SceneObject, ...]
    seed: int
    config: SceneConfig = DEFAULT_CONFIG

    def to_pil(self) -> Image.Image:
        """The image as a PIL RGB image."""
        return Image.fromarray(np.ascontiguousarray(self.image), mode="RGB")

    def object_token_mask(self, patch_size: int | None = None, min_pixels: int = 1) -> np.ndarray:
        """Bool ``[grid, grid]``: patches holding >= ``min_pixels`` object pixels.

        ``patch_size`` defaults to the config's; ``grid = image_size //
        patch_size``, row-major like a ViT token sequence (row = y). Digit
        pixels count as object pixels.
        """
        p = self.config.patch_size if patch_size is None else patch_size
        h, w = self.image.shape[:2]
        if h % p or w % p:
            raise ValueError("image size must be a multiple of patch_size")
        union = np.zeros((h, w), dtype=bool)
        for obj in self.objects:
            union |= obj.mask(h)[:, :w]
        counts = union.reshape(h // p, p, w // p, p).sum(axis=(1, 3))
        return counts >= min_pixels


@dataclass(frozen=True)
class Sample:
    """One question about one scene.

    ``subtype`` refines ``family``: the negative type for ``exists`` (see
    :func:`ask`), ``"total"``/``"shape"`` for ``count``, ``"left"``/``"above"``
    for ``spatial``, otherwise ``None``. ``referents`` indexes the objects the
    question is about (both objects for ``spatial``, the counted or matching
    objects for ``count``/``exists``; empty for a negative).
    """

    scene: Scene
    family: str
    question: str
    answer: str
    subtype: str | None = None
    referents: tuple[int, ...] = ()


# ---------------------------------------------------------------- drawing ---


@cache
def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Read-only bool ``[size, size]`` mask, sampled at pixel centres."""
    c = np.arange(size, dtype=np.float64) + 0.5
    xs, ys = c[None, :], c[:, None]
    half = size / 2
    if shape == "square":
        m = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        m = (xs - half) ** 2 + (ys - half) ** 2 <= half * half
    elif shape == "triangle":
        # Apex at the top centre, base along the bottom edge.
        m = np.abs(xs - half) <= ys / 2
    elif shape == "cross":
        arm = max(2, round(size / 3))
        m = (np.abs(xs - half) < arm / 2) | (np.abs(ys - half) < arm / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m = np.ascontiguousarray(np.broadcast_to(m, (size, size)))
    m.flags.writeable = False
    return m


@cache
def _noise_bank(image_size: int) -> np.ndarray:
    """Read-only standard-normal float32 field ``[2 * size, 2 * size, 3]``."""
    rng = np.random.default_rng(np.random.SeedSequence([0x0015E, image_size]))
    bank = rng.standard_normal((2 * image_size, 2 * image_size, 3), dtype=np.float32)
    bank.flags.writeable = False
    return bank


def _ink_rgb(color: str) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``color``."""
    r, g, b = COLOR_RGB[color]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 128 else (255, 255, 255)


def _boxes_clear(
    box: tuple[int, int, int, int],
    others: Sequence[tuple[int, int, int, int]],
    gap: int,
) -> bool:
    """True if ``box`` keeps at least ``gap`` empty pixels to every other box."""
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in others:
        if x0 < a1 + gap and a0 < x1 + gap and y0 < b1 + gap and b0 < y1 + gap:
            return False
    return True


def _draw_clutter(
    canvas: np.ndarray,
    avoid: Sequence[tuple[int, int, int, int]],
    rng: np.random.Generator,
    config: SceneConfig,
) -> None:
    """Grey thin strokes and small dots that keep clear of ``avoid`` boxes."""
    size = config.image_size
    n = int(rng.integers(config.min_clutter, config.max_clutter + 1))
    for _ in range(n):
        grey = rng.uniform(70, 130) + rng.uniform(-5, 5, 3)
        for _attempt in range(20):
            if rng.random() < 0.6:
                length = rng.uniform(6, 16)
                # Direction without sin/cos: only IEEE-exact sqrt, so the
                # rasterised pixels cannot depend on the platform's libm.
                ux, uy = rng.uniform(-1, 1), rng.uniform(0, 1)
                norm = max(math.sqrt(ux * ux + uy * uy), 1e-9)
                dx, dy = length * ux / norm, length * uy / norm
                # Both endpoints inside [1, size - 1); dy >= 0 by construction.
                x0 = rng.uniform(1 + max(0.0, -dx), size - 1 - max(0.0, dx))
                y0 = rng.uniform(1, size - 1 - dy)
                t = np.linspace(0.0, 1.0, int(np.ceil(length)) * 2 + 1)
                xs = np.floor(x0 + t * dx).astype(np.intp)
                ys = np.floor(y0 + t * dy).astype(np.intp)
            else:
                x0 = int(rng.integers(1, size - 2))
                y0 = int(rng.integers(1, size - 2))
                xs = np.array([x0, x0 + 1, x0, x0 + 1])
                ys = np.array([y0, y0, y0 + 1, y0 + 1])
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if _boxes_clear(box, avoid, config.clutter_gap):
                canvas[ys, xs] = grey
                break


def render_scene(
    objects: Sequence[SceneObject],
    *,
    rng: np.random.Generator,
    config: SceneConfig = DEFAULT_CONFIG,
) -> np.ndarray:
    """Draw ``objects`` on a fresh background; returns read-only uint8 [H, W, 3].

    The background colour, clutter and noise are drawn from ``rng``; the
    objects are drawn exactly as given (overlap is not checked here, but
    clutter never touches any object). Gaussian noise is added to every pixel,
    objects included, then the image is clipped and rounded.
    """
    size = config.image_size
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox()
        if x0 < 0 or y0 < 0 or x1 > size or y1 > size:
            raise ValueError(f"object {obj} is not inside the image")
        if obj.color not in COLOR_RGB:
            raise ValueError(f"unknown colour {obj.color!r}")
    # Dark, low-saturation base: a grey level plus a small per-channel tint.
    base = rng.uniform(18, 60) + rng.uniform(-8, 8, 3)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = base
    _draw_clutter(canvas, [o.bbox() for o in objects], rng, config)
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox()
        region = canvas[y0:y1, x0:x1]
        region[_shape_mask(obj.shape, obj.size)] = COLOR_RGB[obj.color]
        layout = obj.glyph_layout()
        if layout is not None:
            gx0, gy0, scale = layout
            ink = np.kron(_FONT_BITMAPS[obj.digit], np.ones((scale, scale), bool))
            glyph = canvas[gy0 : gy0 + ink.shape[0], gx0 : gx0 + ink.shape[1]]
            glyph[ink] = _ink_rgb(obj.color)
    if config.noise_sigma > 0:
        # A random window of a fixed Gaussian field: fresh i.i.d. normals cost
        # ~1 ms per image, more than everything else together.
        bank = _noise_bank(size)
        ox, oy = (int(v) for v in rng.integers(0, bank.shape[0] - size + 1, 2))
        canvas += bank[oy : oy + size, ox : ox + size] * np.float32(config.noise_sigma)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    image.flags.writeable = False
    return image


# ---------------------------------------------------------------- scenes ---


def attribute_prior(values: Sequence[str], skew: float) -> np.ndarray:
    """Sampling weights (sum 1) for ``values``: linearly decaying with order."""
    n = len(values)
    if n == 1:
        return np.ones(1)
    w = 1.0 - skew * np.arange(n) / (n - 1)
    return w / w.sum()


def _sample_objects(rng: np.random.Generator, config: SceneConfig) -> tuple[SceneObject, ...]:
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    color_p = attribute_prior(config.colors, config.prior_skew)
    shape_p = attribute_prior(config.shapes, config.prior_skew)
    colors = rng.choice(len(config.colors), size=n, replace=False, p=color_p)
    glyph_shapes = config.glyph_shapes
    glyph_min = max(config.min_size, config.glyph_min_size)
    glyph_scene = (
        bool(glyph_shapes) and glyph_min <= config.max_size and rng.random() < config.glyph_prob
    )
    if glyph_shapes:
        glyph_idx = [config.shapes.index(s) for s in glyph_shapes]
        glyph_p = shape_p[glyph_idx] / shape_p[glyph_idx].sum()

    objects: list[SceneObject] = []
    boxes: list[tuple[int, int, int, int]] = []
    for ci in colors:
        if glyph_scene and rng.random() < config.glyph_object_prob:
            shape = glyph_shapes[int(rng.choice(len(glyph_shapes), p=glyph_p))]
            size = int(rng.integers(glyph_min, config.max_size + 1))
            digit: int | None = int(rng.integers(10))
        else:
            shape = config.shapes[int(rng.choice(len(config.shapes), p=shape_p))]
            size = int(rng.integers(config.min_size, config.max_size + 1))
            digit = None
        hi = config.image_size - config.border - size
        # Rejection sampling; with the default 4 objects of <= 40 px in 144 px
        # it did not fail once in 1500 scenes, and a failed object is simply dropped.
        for _attempt in range(100):
            x0 = int(rng.integers(config.border, hi + 1))
            y0 = int(rng.integers(config.border, hi + 1))
            box = (x0, y0, x0 + size, y0 + size)
            if _boxes_clear(box, boxes, config.object_gap):
                boxes.append(box)
                objects.append(
                    SceneObject(
                        shape=shape,
                        color=config.colors[int(ci)],
                        cx=x0 + size / 2,
                        cy=y0 + size / 2,
                        size=size,
                        digit=digit,
                    )
                )
                break
    return tuple(objects)


def make_scene(seed: int, config: SceneConfig = DEFAULT_CONFIG) -> Scene:
    """Generate the scene for ``seed`` (any non-negative int); deterministic."""
    rng = np.random.default_rng(seed)
    objects = _sample_objects(rng, config)
    image = render_scene(objects, rng=rng, config=config)
    return Scene(image=image, objects=objects, seed=seed, config=config)


# ------------------------------------------------------------- questions ---


def plural(shape: str) -> str:
    """English plural of a shape word ("cross" -> "crosses")."""
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def popular_negative(absent: Sequence[str], values: Sequence[str]) -> str:
    """The absent value with the highest generator prior.

    ``values`` is the configured list (its order defines the prior, see
    :func:`attribute_prior`), so this is the first absent value in that order.
    """
    return min(absent, key=values.index)


@cache
def _shape_iou(a: str, b: str) -> float:
    ma, mb = _shape_mask(a, 18), _shape_mask(b, 18)
    return float((ma & mb).sum() / (ma | mb).sum())


def _color_similarity(a: str, b: str) -> float:
    return -math.dist(COLOR_RGB[a], COLOR_RGB[b])


def adversarial_negative(
    absent: Sequence[str], present: Sequence[str], values: Sequence[str], kind: str
) -> str:
    """The absent value most confusable with some present value.

    Confusability is mask IoU of the two shapes drawn at the same size (for
    ``kind == "shape"``) or negative RGB distance (``kind == "color"``); ties
    go to the more popular value. Since attributes are sampled independently,
    co-occurrence carries no signal here, so perceptual nearness stands in for
    POPE's "frequently co-occurring" negatives.
    """
    sim = _shape_iou if kind == "shape" else _color_similarity
    return max(
        absent,
        key=lambda v: (max(sim(v, p) for p in present), -values.index(v)),
    )


def _pick(rng: np.random.Generator, items: Sequence[_T]) -> _T:
    return items[int(rng.integers(len(items)))]


def _ask_color(scene: Scene, rng: np.random.Generator) -> Sample | None:
    objs = scene.objects
    shapes = [o.shape for o in objs]
    unique = [i for i, o in enumerate(objs) if shapes.count(o.shape) == 1]
    if not unique:
        return None
    i = _pick(rng, unique)
    q = f"what color is the {objs[i].shape}"
    return Sample(scene, "color", q, objs[i].color, None, (i,))


def _ask_shape(scene: Scene, rng: np.random.Generator) -> Sample | None:
    if not scene.objects:
        return None
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    q = f"what shape is the {obj.color}"
    return Sample(scene, "shape", q, obj.shape, None, (i,))


def _ask_count(scene: Scene, rng: np.random.Generator) -> Sample | None:
    objs = scene.objects
    if rng.random() < 0.5:
        idx = tuple(range(len(objs)))
        q, sub = "how many objects", "total"
    else:
        # Any configured shape, so "zero" answers occur too.
        shape = _pick(rng, scene.config.shapes)
        idx = tuple(i for i, o in enumerate(objs) if o.shape == shape)
        q, sub = f"how many {plural(shape)}", "shape"
    return Sample(scene, "count", q, NUMBER_WORDS[len(idx)], sub, idx)


def _ask_exists(scene: Scene, rng: np.random.Generator) -> Sample | None:
    cfg, objs = scene.config, scene.objects
    positive = rng.random() < 0.5
    # Subtype is drawn for positives too, so each subtype is a balanced
    # yes/no subset (as in POPE, where positives are shared across subsets).
    subtype = _pick(rng, NEGATIVE_SUBTYPES)
    kinds = ["color", "shape"] if rng.random() < 0.5 else ["shape", "color"]
    for kind in kinds:
        values = cfg.colors if kind == "color" else cfg.shapes
        # Sorted, not a set: set order of str depends on PYTHONHASHSEED.
        present = sorted({getattr(o, kind) for o in objs})
        absent = [v for v in values if v not in present]
        if positive and present:
            value = _pick(rng, present)
        elif not positive and absent:
            if subtype == "random":
                value = _pick(rng, absent)
            elif subtype == "adversarial" and present:
                value = adversarial_negative(absent, present, values, kind)
            else:
                value = popular_negative(absent, values)
        else:
            continue
        idx = tuple(i for i, o in enumerate(objs) if getattr(o, kind) == value)
        ans = "yes" if positive else "no"
        return Sample(scene, "exists", f"is there a {value}", ans, subtype, idx)
    return None


def _ask_spatial(scene: Scene, rng: np.random.Generator) -> Sample | None:
    objs = scene.objects
    margin = scene.config.spatial_margin_patches * scene.config.patch_size
    yes: list[tuple[int, int, str]] = []
    no: list[tuple[int, int, str]] = []
    for a, oa in enumerate(objs):
        for b, ob in enumerate(objs):
            if a == b:
                continue
            for rel, da, db in (("left", oa.cx, ob.cx), ("above", oa.cy, ob.cy)):
                if da < db - margin:
                    yes.append((a, b, rel))
                elif da > db + margin:
                    no.append((a, b, rel))
    if not yes:
        # Swapping the pair flips the answer, so yes and no are empty together.
        return None
    positive = rng.random() < 0.5
    a, b, rel = _pick(rng, yes if positive else no)
    word = "left of" if rel == "left" else "above"
    q = f"is the {objs[a].color} {word} the {objs[b].color}"
    return Sample(scene, "spatial", q, "yes" if positive else "no", rel, (a, b))


def _quadrant(obj: SceneObject, config: SceneConfig) -> str | None:
    mid = config.image_size / 2
    margin = config.location_margin_patches * config.patch_size
    if abs(obj.cx - mid) <= margin or abs(obj.cy - mid) <= margin:
        return None
    return ("top" if obj.cy < mid else "bottom") + ("left" if obj.cx < mid else "right")


def _ask_location(scene: Scene, rng: np.random.Generator) -> Sample | None:
    cands = [
        (i, q) for i, o in enumerate(scene.objects) if (q := _quadrant(o, scene.config)) is not None
    ]
    if not cands:
        return None
    i, quad = _pick(rng, cands)
    q = f"where is the {scene.objects[i].color}"
    return Sample(scene, "location", q, quad, None, (i,))


def _ask_glyph(scene: Scene, rng: np.random.Generator) -> Sample | None:
    cands = [i for i, o in enumerate(scene.objects) if o.digit is not None]
    if not cands:
        return None
    i = _pick(rng, cands)
    obj = scene.objects[i]
    q = f"what digit is on the {obj.color}"
    return Sample(scene, "glyph", q, NUMBER_WORDS[obj.digit], None, (i,))


_ASKERS = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count": _ask_count,
    "exists": _ask_exists,
    "spatial": _ask_spatial,
    "location": _ask_location,
    "glyph": _ask_glyph,
}


def ask(scene: Scene, family: str, rng: np.random.Generator) -> Sample | None:
    """Pose one question of ``family`` about ``scene``; ``None`` if impossible.

    Families (objects are always named by one scene-unique attribute):

    * ``color``: "what color is the {shape}" (shape unique in the scene).
    * ``shape``: "what shape is the {color}".
    * ``count``: "how many objects" (subtype ``total``) or
      "how many {shape}s" for any configured shape (``shape``).
    * ``exists``: "is there a {color}" / "is there a {shape}",
      yes/no 50/50. Subtype is the negative type, drawn uniformly for
      positives and negatives alike: ``random`` = uniform over absent values;
      ``popular`` = absent value with the highest generator prior
      (:func:`popular_negative`); ``adversarial`` = absent value most
      confusable with a present one (:func:`adversarial_negative`).
    * ``spatial``: "is the {c1} left of / above the {c2}",
      yes/no 50/50, only for pairs whose centres differ by more than
      ``spatial_margin_patches`` patches along that axis.
    * ``location``: "where is the {color}" -> one of
      :data:`LOCATIONS`, only for centres further than
      ``location_margin_patches`` patches from both midlines.
    * ``glyph``: "what digit is on the {color}" -> "zero".."nine".
    """
    try:
        asker = _ASKERS[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}") from None
    return asker(scene, rng)


# --------------------------------------------------------------- streams ---

_MAX_ATTEMPTS = 1000
_NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


def make_sample(
    split: str,
    index: int,
    family: str | None = None,
    config: SceneConfig = DEFAULT_CONFIG,
) -> Sample:
    """Deterministic sample ``index`` of ``split``.

    ``family=None`` cycles through :data:`FAMILIES` by index, so any window of
    7 consecutive indices holds each family once. When the family cannot be
    asked of a scene, the next scene of the same (split, index) stream is
    drawn, so e.g. glyph samples come from glyph-bearing scenes only.
    """
    if family is None:
        family = FAMILIES[index % len(FAMILIES)]
    if family not in _ASKERS:
        raise ValueError(f"unknown family {family!r}")
    try:
        split_seed = SPLIT_SEEDS[split]
    except KeyError:
        raise ValueError(f"unknown split {split!r}") from None
    if index < 0:
        raise ValueError("index must be non-negative")
    rng = np.random.default_rng(np.random.SeedSequence([split_seed, index]))
    for _attempt in range(_MAX_ATTEMPTS):
        # 63-bit scene seeds make collisions across splits negligible.
        seed = int(rng.integers(2**63))
        # Same steps as make_scene(seed), but rendering (the costly part) is
        # deferred until the family is known to be askable; ask() only reads
        # the objects, and the scene's own rng continues where it left off.
        scene_rng = np.random.default_rng(seed)
        objects = _sample_objects(scene_rng, config)
        stub = Scene(image=_NO_IMAGE, objects=objects, seed=seed, config=config)
        sample = ask(stub, family, rng)
        if sample is not None:
            image = render_scene(objects, rng=scene_rng, config=config)
            scene = dataclasses.replace(stub, image=image)
            return dataclasses.replace(sample, scene=scene)
    raise RuntimeError(f"family {family!r} is (almost) never askable with {config}")


def iter_samples(
    split: str,
    n: int,
    families: Sequence[str] | None = None,
    config: SceneConfig = DEFAULT_CONFIG,
    start: int = 0,
) -> Iterator[Sample]:
    """Samples ``start .. start + n - 1`` of ``split``.

    Sample ``i`` has family ``families[i % len(families)]`` (default
    :data:`FAMILIES`), i.e. it equals ``make_sample(split, i, that_family)``.
    """
    fams = tuple(FAMILIES if families is None else families)
    if not fams:
        raise ValueError("families must be non-empty")
    for i in range(start, start + n):
        yield make_sample(split, i, fams[i % len(fams)], config)


def vocabulary(config: SceneConfig = DEFAULT_CONFIG) -> list[str]:
    """Every word a question or answer can contain, sorted."""
    words = set(_QUESTION_WORDS)
    words.update(config.colors)
    words.update(config.shapes)
    words.update(plural(s) for s in config.shapes)
    words.update(NUMBER_WORDS[: max(config.max_objects, 9) + 1])
    words.update(LOCATIONS)
    words.update(("yes", "no"))
    return sorted(words)
