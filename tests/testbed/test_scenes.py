"""Tests for the synthetic scene / question generator."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zooprune.testbed import scenes as S
from zooprune.testbed.scenes import Scene, SceneConfig, SceneObject

CFG = SceneConfig()
# Spatial/location margins are one patch of the default config, in pixels.
MARGIN = CFG.spatial_margin_patches * CFG.patch_size


def obj(
    shape: str, color: str, x0: int, y0: int, size: int = 18, digit: int | None = None
) -> SceneObject:
    """Object whose pixel box starts at (x0, y0)."""
    return SceneObject(shape, color, x0 + size / 2, y0 + size / 2, size, digit)


def scene(objects: list[SceneObject], config: SceneConfig = CFG, seed: int = 0):
    image = S.render_scene(objects, rng=np.random.default_rng(seed), config=config)
    return Scene(image=image, objects=tuple(objects), seed=seed, config=config)


def asked(sc: Scene, family: str, n: int = 200) -> list[S.Sample]:
    """``n`` questions of ``family`` about ``sc`` with different rngs."""
    out = [S.ask(sc, family, np.random.default_rng(i)) for i in range(n)]
    assert all(s is not None for s in out)
    return out


def qa(samples: list[S.Sample]) -> dict[str, str]:
    """question -> answer, asserting each question always gets one answer."""
    table: dict[str, str] = {}
    for s in samples:
        assert table.setdefault(s.question, s.answer) == s.answer
    return table


def near(pixel: np.ndarray, rgb: tuple[int, int, int], tol: float = 30) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - np.array(rgb)) <= tol))


def digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.scene.image.tobytes())
        h.update(f"{s.family}|{s.question}|{s.answer}|{s.subtype}".encode())
    return h.hexdigest()


# ------------------------------------------------------------ determinism ---


def test_same_index_gives_identical_sample() -> None:
    for split in S.SPLIT_SEEDS:
        for i in (0, 5, 123):
            a, b = S.make_sample(split, i), S.make_sample(split, i)
            assert a.scene.image.tobytes() == b.scene.image.tobytes()
            assert (a.question, a.answer, a.subtype, a.family) == (
                b.question,
                b.answer,
                b.subtype,
                b.family,
            )
            assert a.scene.objects == b.scene.objects


def test_generation_order_does_not_matter() -> None:
    forward = [S.make_sample("validation", i) for i in range(21)]
    backward = [S.make_sample("validation", i) for i in reversed(range(21))][::-1]
    assert digest(forward) == digest(backward)
    assert digest(S.iter_samples("validation", 21)) == digest(forward)


def test_identical_across_processes_and_hash_seeds() -> None:
    # Guards against set/dict-order or hash() leaking into the output.
    # The module is loaded from its file so that the child process skips the
    # (torch-importing) package __init__; scenes.py is self-contained.
    code = (
        "import hashlib, importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('scenes', sys.argv[1])\n"
        "S = importlib.util.module_from_spec(spec)\n"
        "sys.modules['scenes'] = S\n"
        "spec.loader.exec_module(S)\n"
        "h = hashlib.sha256()\n"
        "for s in S.iter_samples('test', 28):\n"
        "    h.update(s.scene.image.tobytes())\n"
        "    h.update(f'{s.family}|{s.question}|{s.answer}|{s.subtype}'.encode())\n"
        "print(h.hexdigest())\n"
    )
    expected = digest(S.iter_samples("test", 28))
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", code, S.__file__],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == expected


def test_splits_differ() -> None:
    for i in range(10):
        tr, te = S.make_sample("train", i), S.make_sample("test", i)
        assert tr.scene.seed != te.scene.seed
        assert tr.scene.image.tobytes() != te.scene.image.tobytes()
    seeds = {
        split: {S.make_sample(split, i).scene.seed for i in range(50)} for split in S.SPLIT_SEEDS
    }
    assert not seeds["train"] & seeds["test"]
    assert not seeds["train"] & seeds["validation"]


def test_sample_scene_equals_make_scene() -> None:
    # make_sample defers rendering; the result must still be make_scene(seed).
    for i in range(14):
        s = S.make_sample("train", i)
        ref = S.make_scene(s.scene.seed)
        assert ref == s.scene
        assert ref.image.tobytes() == s.scene.image.tobytes()


def test_family_cycling_and_explicit_family() -> None:
    for i, s in enumerate(S.iter_samples("train", 14)):
        assert s.family == S.FAMILIES[i % len(S.FAMILIES)]
        explicit = S.make_sample("train", i, s.family)
        assert explicit.question == s.question and explicit.answer == s.answer
    only = list(S.iter_samples("train", 6, families=["glyph", "count"]))
    assert [s.family for s in only] == ["glyph", "count"] * 3


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        S.make_sample("nope", 0)
    with pytest.raises(ValueError):
        S.make_sample("train", 0, "nope")
    with pytest.raises(ValueError):
        SceneConfig(patch_size=7)
    with pytest.raises(ValueError):
        SceneConfig(colors=("red", "red"))
    with pytest.raises(ValueError):
        SceneConfig(colors=("red", "green"), max_objects=3)
    with pytest.raises(ValueError):  # outside the image
        scene([obj("square", "red", 140, 10)])
    with pytest.raises(ValueError):  # triangles cannot carry digits
        scene([obj("triangle", "red", 10, 10, digit=3)])
    with pytest.raises(ValueError):  # too small for a digit
        scene([obj("circle", "red", 10, 10, size=6, digit=3)])


# ------------------------------------------------- answers on known scenes ---


def test_color_question() -> None:
    sc = scene(
        [
            obj("circle", "red", 10, 10),
            obj("square", "blue", 60, 10),
            obj("square", "green", 100, 100),
        ]
    )
    # Only the circle is unique, so every colour question is about it.
    assert qa(asked(sc, "color")) == {"what color is the circle": "red"}
    two_squares = scene([obj("square", "red", 10, 10), obj("square", "blue", 60, 60)])
    assert S.ask(two_squares, "color", np.random.default_rng(0)) is None


def test_shape_question() -> None:
    sc = scene(
        [
            obj("circle", "red", 10, 10),
            obj("triangle", "cyan", 60, 10),
            obj("cross", "yellow", 100, 100),
        ]
    )
    assert qa(asked(sc, "shape")) == {
        "what shape is the red": "circle",
        "what shape is the cyan": "triangle",
        "what shape is the yellow": "cross",
    }


def test_count_question() -> None:
    sc = scene(
        [
            obj("square", "red", 10, 10),
            obj("square", "blue", 60, 10),
            obj("circle", "green", 100, 100),
        ]
    )
    samples = asked(sc, "count")
    assert qa(samples) == {
        "how many objects": "three",
        "how many squares": "two",
        "how many circles": "one",
        "how many triangles": "zero",
        "how many crosses": "zero",
    }
    assert {s.subtype for s in samples} == {"total", "shape"}


def test_exists_question_and_negative_subtypes() -> None:
    sc = scene([obj("circle", "red", 10, 10), obj("square", "blue", 60, 60)])
    samples = asked(sc, "exists", 400)
    table = qa(samples)
    for q, a in table.items():
        m = re.fullmatch(r"is there a (\w+)", q)
        assert m, q
        assert a == ("yes" if m[1] in {"red", "blue", "circle", "square"} else "no")
    by_sub: dict[str, set[str]] = {}
    for s in samples:
        if s.answer == "no":
            by_sub.setdefault(s.subtype, set()).add(s.question)
    # Prior order: red > green > ... and circle > square > triangle > cross.
    assert by_sub["popular"] == {
        "is there a green",
        "is there a triangle",
    }
    # Nearest absent colour to red/blue in RGB is cyan (to blue); the absent
    # shape overlapping most with a circle or square is the cross.
    assert by_sub["adversarial"] == {"is there a cyan", "is there a cross"}
    assert by_sub["random"] == {
        "is there a green",
        "is there a yellow",
        "is there a magenta",
        "is there a cyan",
        "is there a triangle",
        "is there a cross",
    }
    yes = Counter(s.subtype for s in samples if s.answer == "yes")
    assert set(yes) == set(S.NEGATIVE_SUBTYPES)


def test_exists_falls_back_to_colour_when_all_shapes_present() -> None:
    sc = scene(
        [
            obj("circle", "red", 10, 10),
            obj("square", "blue", 60, 10),
            obj("triangle", "green", 10, 60),
            obj("cross", "yellow", 60, 60),
        ]
    )
    for s in asked(sc, "exists"):
        if s.answer == "no":
            assert s.question in {"is there a magenta", "is there a cyan"}


def test_spatial_question() -> None:
    side_by_side = scene([obj("circle", "red", 10, 60), obj("square", "blue", 100, 62)])
    samples = asked(side_by_side, "spatial")
    # dy = 2 px is within the margin, so only left/right is asked.
    assert qa(samples) == {
        "is the red left of the blue": "yes",
        "is the blue left of the red": "no",
    }
    assert {s.subtype for s in samples} == {"left"}
    stacked = scene([obj("circle", "red", 60, 100), obj("square", "blue", 63, 10)])
    assert qa(asked(stacked, "spatial")) == {
        "is the red above the blue": "no",
        "is the blue above the red": "yes",
    }
    alone = scene([obj("circle", "red", 60, 100)])
    assert S.ask(alone, "spatial", np.random.default_rng(0)) is None


def test_location_question() -> None:
    sc = scene(
        [
            obj("circle", "red", 10, 10),
            obj("square", "blue", 110, 12),
            obj("cross", "green", 14, 100),
            obj("triangle", "yellow", 100, 110),
            # Centre (75, 30): 3 px from the vertical midline -> never asked.
            obj("circle", "cyan", 66, 21),
        ]
    )
    assert qa(asked(sc, "location")) == {
        "where is the red": "topleft",
        "where is the blue": "topright",
        "where is the green": "bottomleft",
        "where is the yellow": "bottomright",
    }
    central = scene([obj("circle", "cyan", 66, 21)])
    assert S.ask(central, "location", np.random.default_rng(0)) is None


def test_glyph_question() -> None:
    sc = scene(
        [
            obj("square", "red", 10, 10, size=18, digit=7),
            obj("circle", "blue", 60, 60, size=20, digit=3),
            obj("triangle", "green", 100, 100),
        ]
    )
    assert qa(asked(sc, "glyph")) == {
        "what digit is on the red": "seven",
        "what digit is on the blue": "three",
    }
    plain = scene([obj("square", "red", 10, 10)])
    assert S.ask(plain, "glyph", np.random.default_rng(0)) is None


# ----------------------------------------------------------------- pixels ---


def test_pixels_match_objects() -> None:
    objects = [
        obj("circle", "red", 10, 10, size=17),
        obj("square", "green", 60, 10, size=14),
        obj("triangle", "blue", 100, 10, size=20),
        obj("cross", "yellow", 10, 60, size=19),
        obj("circle", "magenta", 60, 60, size=15),
        obj("square", "cyan", 100, 60, size=16),
    ]
    sc = scene(objects)
    for o in objects:
        rgb = S.COLOR_RGB[o.color]
        assert near(sc.image[int(o.cy), int(o.cx)], rgb)
        m = o.mask(CFG.image_size)
        assert near(np.median(sc.image[m], axis=0), rgb, tol=4)
        x0, y0, x1, y1 = o.bbox()
        assert m[y0:y1, x0:x1].sum() == m.sum() > 0
    # Shapes differ: the square fills its box, the others do not.
    areas = {o.shape: o.local_mask().mean() for o in objects}
    assert areas["square"] == 1.0 > areas["circle"] > areas["cross"]
    assert 0.4 < areas["triangle"] < 0.6


def test_background_has_no_object_colours() -> None:
    for seed in range(20):
        sc = S.make_scene(seed)
        objs = np.zeros(sc.image.shape[:2], dtype=bool)
        for o in sc.objects:
            objs |= o.mask(CFG.image_size)
        bg = sc.image[~objs].astype(int)
        for rgb in S.COLOR_RGB.values():
            dist = np.abs(bg - np.array(rgb)).max(axis=1)
            assert dist.min() > 60
        # Dark and low-saturation: channels stay close to each other.
        assert np.median(bg.max(axis=1) - bg.min(axis=1)) < 30


def test_clutter_keeps_clear_of_objects() -> None:
    # Without noise the background is exactly one colour, so any other colour
    # near an object (outside its shape) would be clutter touching it.
    cfg = SceneConfig(noise_sigma=0.0, min_clutter=30, max_clutter=30)
    for seed in range(20):
        sc = S.make_scene(seed, cfg)
        colours, counts = np.unique(sc.image.reshape(-1, 3), axis=0, return_counts=True)
        bg = colours[counts.argmax()]
        union = np.zeros(sc.image.shape[:2], dtype=bool)
        for o in sc.objects:
            union |= o.mask(cfg.image_size)
        assert len(colours) > len(sc.objects) + 2  # clutter was drawn
        g = cfg.clutter_gap
        for o in sc.objects:
            x0, y0, x1, y1 = o.bbox()
            ring = np.zeros_like(union)
            ring[max(y0 - g, 0) : y1 + g, max(x0 - g, 0) : x1 + g] = True
            ring &= ~union
            assert (sc.image[ring] == bg).all()


def test_glyph_pixels_spell_the_digit() -> None:
    assert len({S.DIGIT_FONT[d] for d in range(10)}) == 10
    for shape in S.GLYPH_SHAPES:
        # Digits 0-9 on a 5x2 grid, sizes 16..20, white (red) and black
        # (yellow) ink.
        objects = [
            obj(
                shape,
                "red" if d % 2 else "yellow",
                4 + 28 * (d % 5),
                20 + 60 * (d // 5),
                16 + d % 5,
                d,
            )
            for d in range(10)
        ]
        sc = scene(objects)
        for o in objects:
            gx0, gy0, scale = o.glyph_layout()
            assert scale >= 2  # >= 16 px objects get strokes of >= 2 px
            ink = (0, 0, 0) if o.color == "yellow" else (255, 255, 255)
            rows = []
            for r in range(5):
                row = ""
                for c in range(3):
                    y = gy0 + r * scale + scale // 2
                    px = sc.image[y, gx0 + c * scale + scale // 2]
                    if near(px, ink):
                        row += "1"
                    else:
                        assert near(px, S.COLOR_RGB[o.color])
                        row += "0"
                rows.append(row)
            assert tuple(rows) == S.DIGIT_FONT[o.digit]
            # The whole glyph lies inside the shape.
            m = o.mask(CFG.image_size)
            assert m[gy0 : gy0 + 5 * scale, gx0 : gx0 + 3 * scale].all()


def test_object_token_mask() -> None:
    sc = scene([obj("square", "red", 12, 12, size=18), obj("circle", "blue", 60, 90)])
    mask = sc.object_token_mask(patch_size=6)
    assert mask.shape == (24, 24)
    assert mask[2:5, 2:5].all()
    expected = np.zeros((144, 144), dtype=bool)
    expected[12:30, 12:30] = True
    expected |= sc.objects[1].mask(144)
    brute = np.array(
        [
            [expected[6 * r : 6 * r + 6, 6 * c : 6 * c + 6].any() for c in range(24)]
            for r in range(24)
        ]
    )
    assert (mask == brute).all()
    assert sc.object_token_mask().shape == (16, 16)  # the default 9 px patches
    fractions = []
    for seed in range(50):
        g = S.make_scene(seed)
        m = g.object_token_mask(patch_size=6)
        for o in g.objects:
            assert m[int(o.cy) // 6, int(o.cx) // 6]
        fractions.append(m.mean())
    # Most tokens are background (the default 28-40 px objects cover ~16% on average).
    assert max(fractions) < 0.4
    assert 0.05 < np.mean(fractions) < 0.25


def test_patch_nine_config() -> None:
    cfg = SceneConfig(patch_size=9)
    s = S.make_sample("train", 4, "spatial", cfg)
    assert s.scene.image.shape == (144, 144, 3)
    assert s.scene.object_token_mask().shape == (16, 16)
    assert cfg.grid_size == 16


# ------------------------------------------------- generated constraints ---


def test_generated_scenes_satisfy_constraints() -> None:
    n_objects = Counter()
    for seed in range(300):
        sc = S.make_scene(seed)
        objs = sc.objects
        n_objects[len(objs)] += 1
        assert CFG.min_objects <= len(objs) <= CFG.max_objects
        assert len({o.color for o in objs}) == len(objs)
        boxes = [o.bbox() for o in objs]
        for o, (x0, y0, x1, y1) in zip(objs, boxes, strict=True):
            assert CFG.min_size <= o.size <= CFG.max_size
            assert x0 >= CFG.border and y0 >= CFG.border
            assert x1 <= 144 - CFG.border and y1 <= 144 - CFG.border
            if o.digit is not None:
                assert o.shape in S.GLYPH_SHAPES and o.size >= CFG.glyph_min_size
        for i in range(len(boxes)):
            for j in range(i):
                a, b = boxes[i], boxes[j]
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= CFG.object_gap
    assert set(n_objects) == {1, 2, 3, 4}


def test_prior_makes_first_values_popular() -> None:
    colours, shapes = Counter(), Counter()
    for seed in range(300):
        for o in S.make_scene(seed).objects:
            colours[o.color] += 1
            shapes[o.shape] += 1
    assert colours["red"] > colours["cyan"]
    assert shapes["circle"] > shapes["cross"]


def test_yes_no_balance() -> None:
    for family in ("exists", "spatial"):
        samples = list(S.iter_samples("train", 400, families=[family]))
        yes = sum(s.answer == "yes" for s in samples) / len(samples)
        assert 0.4 < yes < 0.6, (family, yes)
        assert {s.answer for s in samples} == {"yes", "no"}
    subtypes = Counter(s.subtype for s in S.iter_samples("test", 300, ["exists"]))
    assert set(subtypes) == set(S.NEGATIVE_SUBTYPES)
    assert min(subtypes.values()) > 60


def test_every_family_askable_often() -> None:
    minimum = {"color": 0.7, "spatial": 0.6, "location": 0.8, "glyph": 0.25}
    scenes = [S.make_scene(seed) for seed in range(300)]
    for family in S.FAMILIES:
        rng = np.random.default_rng(0)
        rate = np.mean([S.ask(sc, family, rng) is not None for sc in scenes])
        assert rate >= minimum.get(family, 1.0), (family, rate)


def test_vocabulary_covers_samples() -> None:
    vocab = S.vocabulary()
    assert vocab == sorted(set(vocab))
    words = set()
    answers = Counter()
    for s in S.iter_samples("train", 500):
        assert not s.question.endswith("?") and s.question == s.question.lower()
        assert " " not in s.answer and s.answer
        words.update(s.question.split())
        words.add(s.answer)
        answers[s.family] += 1
    assert words <= set(vocab)
    assert all(answers[f] > 60 for f in S.FAMILIES)
    small = S.vocabulary(SceneConfig(shapes=("circle", "square", "cross")))
    assert "triangle" not in small and "crosses" in small


# -------------------------------------------------------------- property ---


@st.composite
def object_lists(draw) -> list[SceneObject]:
    n = draw(st.integers(0, 5))
    colours = draw(st.permutations(list(S.COLOR_RGB)))[:n]
    out = []
    for colour in colours:
        size = draw(st.integers(14, 20))
        shape = draw(st.sampled_from(S.SHAPES))
        digit = None
        if shape in S.GLYPH_SHAPES and size >= 16:
            digit = draw(st.none() | st.integers(0, 9))
        x0 = draw(st.integers(0, 144 - size))
        y0 = draw(st.integers(0, 144 - size))
        out.append(obj(shape, colour, x0, y0, size, digit))
    return out


def reference_answer(objects: list[SceneObject], question: str) -> str:
    """Answer ``question`` straight from the object list."""
    by_colour = {o.color: o for o in objects}
    number = S.NUMBER_WORDS
    if m := re.fullmatch(r"what color is the (\w+)", question):
        (hit,) = [o for o in objects if o.shape == m[1]]
        return hit.color
    if m := re.fullmatch(r"what shape is the (\w+)", question):
        return by_colour[m[1]].shape
    if question == "how many objects":
        return number[len(objects)]
    if m := re.fullmatch(r"how many (\w+)", question):
        return number[sum(S.plural(o.shape) == m[1] for o in objects)]
    if (m := re.fullmatch(r"is there a (\w+)", question)) and m[1] in S.DEFAULT_CONFIG.colors:
        return "yes" if m[1] in by_colour else "no"
    if m := re.fullmatch(r"is there a (\w+)", question):
        return "yes" if any(o.shape == m[1] for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+) (left of|above) the (\w+)", question):
        a, b = by_colour[m[1]], by_colour[m[3]]
        da, db = (a.cx, b.cx) if m[2] == "left of" else (a.cy, b.cy)
        assert abs(da - db) > MARGIN  # only unambiguous pairs may be asked
        return "yes" if da < db else "no"
    if m := re.fullmatch(r"where is the (\w+)", question):
        o = by_colour[m[1]]
        assert abs(o.cx - 72) > MARGIN and abs(o.cy - 72) > MARGIN
        return ("top" if o.cy < 72 else "bottom") + ("left" if o.cx < 72 else "right")
    if m := re.fullmatch(r"what digit is on the (\w+)", question):
        return number[by_colour[m[1]].digit]
    raise AssertionError(f"unexpected question {question!r}")


def askable(objects: list[SceneObject], family: str) -> bool:
    shapes = Counter(o.shape for o in objects)
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    return {
        "color": any(c == 1 for c in shapes.values()),
        "shape": bool(objects),
        "count": True,
        "exists": True,
        "spatial": any(abs(a.cx - b.cx) > MARGIN or abs(a.cy - b.cy) > MARGIN for a, b in pairs),
        "location": any(abs(o.cx - 72) > MARGIN and abs(o.cy - 72) > MARGIN for o in objects),
        "glyph": any(o.digit is not None for o in objects),
    }[family]


@given(object_lists(), st.sampled_from(S.FAMILIES), st.integers(0, 2**32))
def test_ask_agrees_with_reference(objects, family, seed) -> None:
    # ask() never reads pixels, so a blank image keeps this fast.
    sc = Scene(np.zeros((144, 144, 3), np.uint8), tuple(objects), seed=0)
    sample = S.ask(sc, family, np.random.default_rng(seed))
    if objects or family != "exists":  # an empty scene has no "yes" to ask
        assert (sample is not None) == askable(objects, family)
    if sample is None:
        return
    assert sample.family == family
    assert sample.answer == reference_answer(objects, sample.question)
    assert set(sample.question.split()) | {sample.answer} <= set(S.vocabulary())
    if family == "exists" and sample.answer == "no":
        m = re.fullmatch(r"is there a (\w+)", sample.question)
        kind = "color" if m[1] in S.COLOR_RGB else "shape"
        values = CFG.colors if kind == "color" else CFG.shapes
        present = {getattr(o, kind) for o in objects}
        absent = [v for v in values if v not in present]
        assert m[1] in absent
        if sample.subtype == "popular":
            assert m[1] == absent[0]
        elif sample.subtype == "adversarial" and present:

            def closeness(v: str) -> float:
                if kind == "color":
                    return -min(math.dist(S.COLOR_RGB[v], S.COLOR_RGB[p]) for p in present)
                a = obj(v, "red", 0, 0).mask(18)
                return max(
                    (a & (b := obj(p, "red", 0, 0).mask(18))).sum() / (a | b).sum() for p in present
                )

            assert closeness(m[1]) == max(closeness(v) for v in absent)
