"""Engine-neutral token selection: what every image of a call keeps, and the record of it.

Every engine runs the same four steps: its adapter encodes the images
(:class:`EncodedImages`: features, projected tokens, the layout of each image's run of
placeholders); :meth:`Selector.select` shares each image's budget over its units (crops,
or the whole image), runs the method over units of equal shape in batched calls and
assembles each image's kept slots (separators policy); the engine places the kept runs
into its own prompt; :func:`selection_record` maps the choice back to prompt positions,
crops and cells. Pure torch, no engine imports: the Hugging Face handle
(``zooprune.api``) and a serving engine share this one piece of code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.budget import Budget, split_evenly
from zooprune.errors import NonFiniteFeaturesError, PlaceholderMismatchError, PruneError
from zooprune.record import ImageSelection, Selection
from zooprune.select import METHODS, MethodSpec, TokenSet, check_estimator, get_method
from zooprune.select.ops import all_finite

#: the layout options a multi-crop family may accept (``Adapter.options``), first = default
CROP_BUDGETS = ("split", "global")
SEPARATOR_POLICIES = ("all", "nonempty")
#: how a video's budget is shared (``Adapter.options["video_budget"]``), first = default:
#: evenly over its frames, or over all its tokens at once
VIDEO_BUDGETS = ("frame", "global")
#: every layout option a family may accept, with its values (a family accepts a subset:
#: ``Adapter.options``, or what an engine's variant can honour)
LAYOUT_OPTIONS: dict[str, tuple[str, ...]] = {
    "crop_budget": CROP_BUDGETS,
    "separators": SEPARATOR_POLICIES,
    "video_budget": VIDEO_BUDGETS,
}
#: what an item of a call is: an image, or a video whose crops are its frames
ITEM_KINDS = ("image", "video")


#: a crop's (top, left, bottom, right) in the original image's pixels
Box = tuple[float, float, float, float]


@dataclass
class ImageLayout:
    """Where one image's visual tokens sit in its run of placeholders, and what they show.

    The run holds S placeholders: the N visual tokens (the candidates a method chooses
    from) and S - N separators (e.g. LLaVA-NeXT's ``image_newline`` after each row), which
    are never scored nor counted in the budget. Each visual token comes from one crop
    (crop 0 is the only one of a single-crop model; for AnyRes, crop 0 is the base image
    and crops 1.. are the sub-crops in raster order) and one patch cell of that crop.

    Attributes:
        packed: ``[S, d_l]`` what the model itself places in the run, separators included.
        token_slots: ``[N]`` slot of each visual token in the run, ascending.
        separator_of: ``[N]`` slot of the separator that closes the token's row, -1 if none.
        crop: ``[N]`` crop index of each visual token.
        cell: ``[N, 2]`` (row, column) of the token's patch in its crop's ``patch_grids``.
        crop_grids: per crop, ``(rows, cols)`` its tokens form in the prompt, raster order
            (after unpadding or pooling); ``(1, n)`` when they form no rectangle.
        patch_grids: per crop, ``(height, width)`` of its token grid: the tower's patch grid,
            or the grid after the connector merges patches (pixel shuffle, patch merger).
        boxes: per crop, ``(top, left, bottom, right)`` in the original image's pixels, or
            None when unknown; a crop holding padding reaches past the image.
        kind: ``"image"``, or ``"video"``: then each crop is one frame (the temporal
            slice the model encodes as one grid), in time order, and its placeholders
            are the video's (``Adapter.video_token_id``).
        text_separators: the separators are text tokens of the prompt that the model
            embeds itself (Mistral 3's ``[IMG_BREAK]``), not placeholders it fills: the
            placeholders are the N token slots of a run that is contiguous in the prompt,
            ``packed``'s separator rows are unused, and a kept run holds the kept tokens
            only; a dropped separator leaves the prompt as a dropped placeholder does.
    """

    packed: Tensor
    token_slots: Tensor
    separator_of: Tensor
    crop: Tensor
    cell: Tensor
    crop_grids: list[tuple[int, int]]
    patch_grids: list[tuple[int, int]]
    boxes: list[Box] | None = None
    kind: str = "image"
    text_separators: bool = False

    @classmethod
    def frames(
        cls, projected: Tensor, grid: tuple[int, int], frames: int, closing: bool = False
    ) -> ImageLayout:
        """A video: ``frames`` grids in time order, each a crop; with ``closing``, one
        separator ends the run (OneVision's newline after the last frame).

        Args:
            projected: ``[frames * h * w (+ 1), d_l]`` the run as the model fills it.
            grid: ``(h, w)`` of one frame's tokens.
        """
        per_frame = grid[0] * grid[1]
        n, device = per_frame * frames, projected.device
        if projected.shape[0] != n + int(closing):
            raise ValueError(
                f"a video of {frames} frames of {grid} tokens fills {n + int(closing)} "
                f"placeholders, not {projected.shape[0]}"
            )
        index = torch.arange(n, device=device)
        within = index % per_frame
        return cls(
            packed=projected,
            token_slots=index,
            separator_of=torch.full((n,), n if closing else -1, dtype=torch.long, device=device),
            crop=index // per_frame,
            cell=torch.stack([within // grid[1], within % grid[1]], dim=-1),
            crop_grids=[grid] * frames,
            patch_grids=[grid] * frames,
            kind="video",
        )

    @classmethod
    def single(cls, projected: Tensor, grid: tuple[int, int]) -> ImageLayout:
        """One crop, no separators: the run is the ``[N, d_l]`` tokens on ``grid``."""
        n, device = projected.shape[0], projected.device
        index = torch.arange(n, device=device)
        return cls(
            packed=projected,
            token_slots=index,
            separator_of=torch.full((n,), -1, dtype=torch.long, device=device),
            crop=torch.zeros(n, dtype=torch.long, device=device),
            cell=torch.stack([index // grid[1], index % grid[1]], dim=-1),
            crop_grids=[grid],
            patch_grids=[grid],
        )

    @property
    def slots(self) -> int:
        """S, the image's placeholders in the prompt."""
        return self.packed.shape[0]

    @property
    def placeholders(self) -> int:
        """The image's placeholder tokens in the prompt: S, or N with text separators."""
        return self.token_slots.numel() if self.text_separators else self.slots

    def run_positions(self, placed: Tensor) -> Tensor:
        """``[2, S]`` (prompt row, position) of every slot of the run, from ``placed``
        ``[2, placeholders]``, where the image's placeholders are.

        Raises:
            PlaceholderMismatchError: with text separators, the placeholders are not the
                token slots of one contiguous run (a prompt the processor did not build).
        """
        if not self.text_separators or placed.shape[1] == 0:
            return placed
        row, col = placed
        run = col[0] + torch.arange(self.slots, device=col.device)
        if not torch.equal(run[self.token_slots.to(col.device)], col):
            raise PlaceholderMismatchError(
                f"the {col.numel()} image placeholders from prompt {int(row[0])}, position "
                f"{int(col[0])} are not laid out as the image's rows ({self.crop_grids[0]}, "
                "one separator token between rows); build the prompt with the model's processor"
            )
        return torch.stack([row[:1].expand(self.slots), run])

    @property
    def separator_slots(self) -> Tensor:
        """``[S - N]`` the slots holding separators."""
        is_token = torch.zeros(self.slots, dtype=torch.bool, device=self.token_slots.device)
        is_token[self.token_slots] = True
        return (~is_token).nonzero().flatten()

    def units(self, crop_budget: str) -> list[tuple[Tensor, tuple[int, int]]]:
        """The groups a budget is split over: ``(token indices [n_u], grid)`` each.

        ``"split"``: one group per non-empty crop (frame), on that crop's grid.
        ``"global"``: one group of all N tokens, on the crop's grid if there is one crop,
        else ``(1, N)``.
        """
        n = self.token_slots.numel()
        counts = torch.bincount(self.crop).tolist()  # crops without tokens count 0 or not at all
        crops = [c for c, count in enumerate(counts) if count]
        if len(crops) == 1:
            return [(torch.arange(n, device=self.crop.device), self.crop_grids[crops[0]])]
        if crop_budget == "global":
            return [(torch.arange(n, device=self.crop.device), (1, n))]
        return [((self.crop == c).nonzero().flatten(), self.crop_grids[c]) for c in crops]

    def assemble(
        self, indices: Tensor, tokens: Tensor, separators: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The kept slots of the run and what fills them.

        Args:
            indices: ``[K]`` kept visual tokens, ascending.
            tokens: ``[K, d_l]`` the token placed at each of them.
            separators: ``"all"`` keeps every separator; ``"nonempty"`` keeps only those
                closing a row that still holds a kept token.

        Returns:
            ``[K + S']`` kept slots ascending, ``[K + S', d_l]`` their tokens, ``[S']`` the
            kept separators' slots.
        """
        token_slots = self.token_slots[indices]
        every = self.separator_slots
        if every.numel() == 0:
            return token_slots, tokens, every
        if separators == "all":
            kept_separators = every
        else:
            closing = self.separator_of[indices]
            kept_separators = closing[closing >= 0].unique()
        slots, order = torch.cat([token_slots, kept_separators]).sort()
        if self.text_separators:  # the prompt holds them: the model gets the tokens only
            return slots, tokens.to(self.packed.dtype), kept_separators
        filled = torch.cat([tokens.to(self.packed.dtype), self.packed[kept_separators]])
        return slots, filled[order], kept_separators


@dataclass
class EncodedImages:
    """The visual tokens of every image (and video) in a call, as the model computed them.

    Items come in the order the model fills them: every image in the order given, then
    every video (``layouts[i].kind``); the per-item lists below follow that order.

    Attributes:
        features: per image, projector inputs ``[N_i, d_v]``.
        projected: per image, projector outputs ``[N_i, d_l]`` (what fills the prompt).
        grids: per image, ``(height, width)`` with ``height * width == N_i``, or ``(1, N_i)``.
        cls_attention: per image ``[N_i]``, when asked for.
        keys: per image ``[N_i, d_k]``, when asked for.
        cls_features: per image ``[d_v]``, the CLS token's projector input, when asked
            for (``"cls_token"``; single-crop families only).
        encoder_output: the model's own encoder output, reused when calling the model.
        layouts: per image, where its tokens sit among its placeholders (separators,
            crops); None (given) means every image is one crop of N placeholders on its
            grid, and is filled in so.
        instruction: per image ``[T_i, d_l]``, the input embeddings of the text tokens of
            the prompt that holds it, when asked for (``"instruction"``; the engine fills
            it in, not the adapter).
        tower_attention: per item ``[N_i]``, the attention each token receives in the
            tower's feature layer, when asked for (``"tower_attention"``); None for an
            item the adapter gives none (an image, where only videos have it).
    """

    features: list[Tensor]
    projected: list[Tensor]
    grids: list[tuple[int, int]]
    cls_attention: list[Tensor] | None
    keys: list[Tensor] | None
    encoder_output: Any
    layouts: list[ImageLayout] | None = None
    cls_features: list[Tensor] | None = None
    instruction: list[Tensor] | None = None
    tower_attention: list[Tensor | None] | None = None

    @classmethod
    def joined(cls, parts: list[EncodedImages], encoder_output: Any) -> EncodedImages:
        """One call's items from its parts (e.g. its images, then its videos), in order.

        For families whose parts carry no extras but the tower's attention (CLS
        attention, keys, CLS features); ``encoder_output`` is the model's own output for
        the whole call.
        """
        if any(p.cls_attention or p.keys or p.cls_features for p in parts):
            raise ValueError("joining encoded parts drops no extras: these parts carry some")
        return cls(
            features=[f for part in parts for f in part.features],
            projected=[p for part in parts for p in part.projected],
            grids=[g for part in parts for g in part.grids],
            cls_attention=None,
            keys=None,
            encoder_output=encoder_output,
            layouts=[layout for part in parts for layout in part.layouts],
            tower_attention=None
            if all(part.tower_attention is None for part in parts)
            else [
                a for part in parts for a in (part.tower_attention or [None] * len(part.projected))
            ],
        )

    def item(self, i: int, finite: bool = False) -> EncodedImages:
        """Item ``i`` alone (the same call's encoder output); with ``finite``, its NaN and
        infinite values replaced by zeros."""
        return self.items([i], finite)

    def items(self, indices: list[int], finite: bool = False) -> EncodedImages:
        """The items at ``indices``, in that order (the same call's encoder output); with
        ``finite``, their NaN and infinite values replaced by zeros."""

        def some(per_item: list[Tensor] | None) -> list[Tensor] | None:
            if per_item is None:
                return None
            values = [per_item[i] for i in indices]
            if not finite:
                return values
            return [None if v is None else v.nan_to_num(0.0, 0.0, 0.0) for v in values]

        return EncodedImages(
            features=some(self.features),
            projected=some(self.projected),
            grids=[self.grids[i] for i in indices],
            cls_attention=some(self.cls_attention),
            keys=some(self.keys),
            encoder_output=self.encoder_output,
            layouts=[self.layouts[i] for i in indices],
            cls_features=some(self.cls_features),
            instruction=some(self.instruction),
            tower_attention=some(self.tower_attention),
        )

    def __post_init__(self) -> None:
        if self.layouts is None:  # every image one crop of N placeholders on its grid
            self.layouts = [
                ImageLayout.single(p, g) for p, g in zip(self.projected, self.grids, strict=True)
            ]


@dataclass(frozen=True)
class KeptImage:
    """What one image keeps, and where it goes in the image's run of placeholders.

    Attributes:
        indices: ``[K]`` kept visual tokens, ascending (indices into its N tokens).
        scores: ``[N]`` what the method ranked by (NaN for the tokens of a unit that
            kept nothing), or None.
        slots: ``[K + S']`` the kept slots of its run, ascending.
        run: ``[K + S', d_l]`` what fills them: the kept tokens (merged or pooled ones
            where the method builds tokens) and the kept separators (``[K, d_l]``, the
            tokens only, where the separators are text: ``layout.text_separators``).
        separators: ``[S']`` the kept separators' slots.
        layout: the image's layout.
        grid: its ``(height, width)`` for the record.
    """

    indices: Tensor
    scores: Tensor | None
    slots: Tensor
    run: Tensor
    separators: Tensor
    layout: ImageLayout
    grid: tuple[int, int]


@dataclass(frozen=True)
class Kept:
    """What a call keeps: one :class:`KeptImage` per image, and the methods' details."""

    images: list[KeptImage]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Unit:
    """One group of tokens a budget share is selected from (a crop, or a whole image)."""

    image: int
    crop: int | None  # None: the whole image
    indices: Tensor  # [n_u] into the image's N tokens
    grid: tuple[int, int]
    share: int
    kind: str  # "image" or "video"
    index: int  # among the call's items of that kind
    frames: int = 1  # a whole video's frames (its grid is one frame's)

    @property
    def name(self) -> str:
        return f"{self.kind} {self.index}"

    def where(self) -> str:
        if self.crop is None:
            return self.name
        return f"{self.name}, {'frame' if self.kind == 'video' else 'crop'} {self.crop}"


def take_layout_options(
    options: dict[str, Any], allowed: Mapping[str, tuple[str, ...]]
) -> dict[str, str]:
    """Remove the layout options in ``allowed`` from ``options``; all of them, defaults filled.

    ``allowed`` maps each option a family accepts to its values, the default first.
    """
    chosen = {}
    for name, values in allowed.items():
        value = options.pop(name, values[0])
        if not isinstance(value, str) or value not in values:
            raise PruneError(f"{name} must be one of {', '.join(values)}, got {value!r}")
        chosen[name] = value
    return chosen


@dataclass(frozen=True)
class Selector:
    """A method with its options, a budget and layout options: how to choose tokens.

    Build it with :meth:`build` (every value is checked there, before any call), then
    call :meth:`select` on each call's encoded images. Engines share it: the Hugging Face
    handle holds one, a serving engine builds one from its settings.

    Attributes:
        method: the registered method.
        budget: ``keep=`` / ``ratio=``.
        options: the method's options as given, checked and normalised.
        layout: the family's layout options with defaults filled (``crop_budget``,
            ``separators``, ``video_budget``; empty for a family with none).
    """

    method: MethodSpec
    budget: Budget
    options: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        method: str,
        *,
        keep: int | None = None,
        ratio: float | None = None,
        options: Mapping[str, Any] | None = None,
        layout_options: Mapping[str, tuple[str, ...]] | None = None,
    ) -> Selector:
        """Check everything and build; ``options`` mixes method and layout options.

        Raises:
            PruneError: (or a subclass) naming the bad value and what is accepted.
        """
        spec = get_method(method)
        if spec.videos_only and "video_budget" in (options or {}):
            raise PruneError(
                f"method {spec.name!r} shares a video's budget itself (over its temporal "
                "segments): it takes no video_budget"
            )
        rest = dict(options or {})
        layout = take_layout_options(rest, layout_options or {})
        stray = [name for name in rest if name in LAYOUT_OPTIONS]
        if stray:  # the model's, not the method's, to refuse
            takes = ", ".join(layout_options or {}) or "none"
            raise PruneError(
                f"{stray[0]} is a layout option this model's family does not take (the "
                f"layout options it takes: {takes})"
            )
        budget = Budget(keep=keep, ratio=ratio)
        return cls(spec, budget, spec.resolve_options(rest, budget.keep), layout)

    @property
    def needs(self) -> frozenset[str]:
        """What the method needs from the model beyond features, with these options."""
        return self.method.needs_for(self.options)

    def check_provided(self, provided: frozenset[str], model_name: str) -> None:
        """Refuse a model that cannot give the method what it needs, naming those it can."""
        missing = self.needs - provided
        if missing:
            usable = sorted(
                name for name, spec in METHODS.items() if spec.needs_for({}) <= provided
            )
            raise PruneError(
                f"method {self.method.name!r} needs {', '.join(sorted(missing))}, which this "
                f"{model_name} does not provide; methods that apply: {', '.join(usable)}"
            )

    def check_projector(self, projector: nn.Module) -> None:
        """Refuse options the model's scored ``projector`` cannot run (an estimator only an
        MLP has), before any image: a server refuses at start, not at a request."""
        estimator = self.options.get("estimator")
        if estimator is not None:
            check_estimator(estimator, projector)

    def select(self, encoded: EncodedImages, projector: nn.Module) -> Kept:
        """Choose the kept tokens of every image of a call.

        Each item's budget is shared over its units (``layout["crop_budget"]`` for an
        image's crops, ``layout["video_budget"]`` for a video's frames); units
        of equal size, budget and grid go through the method in one batched call.

        Raises:
            NonFiniteFeaturesError: an image's features or tokens hold NaN or inf.
            BudgetError: the budget does not fit an image.
            PruneError: the method cannot serve a unit (naming the image and crop), or
                scored every token of one NaN, infinite or zero.
        """
        layouts = encoded.layouts
        units = self._units(encoded, layouts)
        groups: dict[tuple, list[_Unit]] = defaultdict(list)
        for unit in units:
            groups[(unit.indices.numel(), unit.grid, unit.share, unit.frames)].append(unit)
        picked: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)
        scores: list[Tensor | None] = [None] * len(layouts)
        details: dict[str, Any] = {}
        for (_, grid, k, frames), members in groups.items():
            text, text_mask = _padded(encoded.instruction, members, encoded.projected)
            token_set = TokenSet(
                features=_gather(encoded.features, members),
                projected=_gather(encoded.projected, members),
                projector=projector,
                grid=grid,
                cls_attention=_gather(encoded.cls_attention, members),
                keys=_gather(encoded.keys, members),
                cls_features=None
                if encoded.cls_features is None
                else torch.stack([encoded.cls_features[u.image] for u in members]),
                instruction=text,
                instruction_mask=text_mask,
                frames=frames,
                tower_attention=_gather(encoded.tower_attention, members),
            )
            try:
                result = self.method(token_set, k, **self.options)
            except PruneError as error:
                raise type(error)(f"{members[0].where()}: {error}") from None
            details.update(result.details)
            if result.scores is not None:
                self._check_scores(result.scores, members, result.details)
            for row, unit in enumerate(members):
                projected = encoded.projected[unit.image]
                chosen = unit.indices[result.indices[row].to(unit.indices.device)]
                made = (
                    projected[chosen]
                    if result.tokens is None
                    else result.tokens[row].to(projected.dtype)
                )
                picked[unit.image].append((chosen, made))
                if result.scores is not None:
                    if scores[unit.image] is None:
                        n = projected.shape[0]
                        scores[unit.image] = result.scores.new_full((n,), float("nan"))
                    where = unit.indices.to(result.scores.device)
                    scores[unit.image][where] = result.scores[row]
        separators = self.layout.get("separators", "all")
        images = []
        for i, layout in enumerate(layouts):
            indices, order = torch.cat([c for c, _ in picked[i]]).sort()
            tokens = torch.cat([t for _, t in picked[i]])[order]
            slots, run, kept_separators = layout.assemble(indices, tokens, separators)
            images.append(
                KeptImage(indices, scores[i], slots, run, kept_separators, layout, encoded.grids[i])
            )
        return Kept(images, details)

    def _units(self, encoded: EncodedImages, layouts: list[ImageLayout]) -> list[_Unit]:
        """Every image's units with their budget shares (units that keep nothing left out)."""
        policy = {
            "image": self.layout.get("crop_budget", "split"),
            "video": "split" if self.layout.get("video_budget", "frame") == "frame" else "global",
        }
        units = []
        for i, (layout, (kind, index)) in enumerate(zip(layouts, item_keys(layouts), strict=True)):
            name = f"{kind} {index}"
            if self.method.videos_only and kind != "video":
                raise PruneError(
                    f"method {self.method.name!r} merges tokens across a video's frames: it "
                    f"prunes videos only, and {name} is an image; prune images with another "
                    "method"
                )
            for what, t in (("features", encoded.features[i]), ("tokens", encoded.projected[i])):
                if not all_finite(t):
                    raise NonFiniteFeaturesError(f"{name}'s visual {what} contain NaN or inf")
            k = self.budget.tokens_for(encoded.features[i].shape[0], name)
            if self.method.videos_only:  # the whole video, one frame's grid
                frames = len(layout.crop_grids)
                idx = torch.arange(encoded.features[i].shape[0], device=layout.crop.device)
                units.append(_Unit(i, None, idx, layout.crop_grids[0], k, kind, index, frames))
                continue
            parts = layout.units(policy[layout.kind])
            shares = split_evenly(k, [idx.numel() for idx, _ in parts])
            for (idx, grid), share in zip(parts, shares, strict=True):
                if share:
                    crop = int(layout.crop[idx[0]]) if len(parts) > 1 else None
                    units.append(_Unit(i, crop, idx, grid, share, kind, index))
        return units

    def _check_scores(self, scores: Tensor, members: list[_Unit], details: dict) -> None:
        """A unit whose scores are all NaN/inf or all zero has nothing to rank by."""
        finite = torch.isfinite(scores).all(dim=-1)
        zero = (scores == 0).all(dim=-1)
        for row, unit in enumerate(members):
            if bool(finite[row]) and not bool(zero[row]):
                continue
            what = "0 for every token" if bool(finite[row]) else "NaN or infinite"
            given = ", ".join(f"{k}={v!r}" for k, v in {**details, **self.options}.items())
            raise PruneError(
                f"method {self.method.name!r} scored {unit.where()} {what} "
                f"({given or 'default options'}): there is nothing to rank by. A step "
                "outside the features' float resolution does this; try other option values"
            )


def item_keys(layouts: list[ImageLayout]) -> list[tuple[str, int]]:
    """``(kind, index)`` of each item: its kind and its index among the items of that kind
    (the order the caller gave them in), e.g. ``("image", 0), ("video", 0)``."""
    seen: dict[str, int] = defaultdict(int)
    keys = []
    for layout in layouts:
        keys.append((layout.kind, seen[layout.kind]))
        seen[layout.kind] += 1
    return keys


def item_names(layouts: list[ImageLayout]) -> list[str]:
    """``"image 0"``, ..., ``"video 0"``, ...: what messages call each item."""
    return [f"{kind} {index}" for kind, index in item_keys(layouts)]


def _padded(
    per_image: list[Tensor] | None, members: list[_Unit], projected: list[Tensor]
) -> tuple[Tensor | None, Tensor | None]:
    """``[len(members), T, d]`` each member's image's rows of a ragged per-image quantity,
    padded with zeros to the longest, on the device of its tokens, and the ``[len(members),
    T]`` mask of the real rows; (None, None) when there is none."""
    if per_image is None:
        return None, None
    device = projected[members[0].image].device
    rows = [per_image[u.image].to(device) for u in members]
    longest = max(r.shape[0] for r in rows)
    padded = rows[0].new_zeros(len(rows), longest, rows[0].shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        padded[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return padded, mask


def _gather(per_image: list[Tensor] | None, members: list[_Unit]) -> Tensor | None:
    """``[len(members), n_u, ...]`` the members' rows of a per-image quantity."""
    if per_image is None:
        return None
    # A unit of the whole image needs no gather (every single-crop model).
    return torch.stack(
        [
            per_image[u.image]
            if u.indices.numel() == per_image[u.image].shape[0]
            else per_image[u.image][u.indices]
            for u in members
        ]
    )


def selection_record(
    kept: Kept,
    located: list[Tensor],
    method: str,
    budget: Budget,
    *,
    encode_seconds: float,
    select_seconds: float,
) -> Selection:
    """The record of a call: what each image kept, mapped to prompt positions and cells.

    Args:
        located: per image, ``[2, S_i]`` (prompt row, position) of its placeholders.
    """
    return Selection(
        method=method,
        budget=str(budget),
        images=[
            _image_record(index, place, image)
            for (_, index), place, image in zip(
                item_keys([image.layout for image in kept.images]),
                located,
                kept.images,
                strict=True,
            )
        ],
        encode_seconds=encode_seconds,
        select_seconds=select_seconds,
        details=dict(kept.details),
    )


def _image_record(image: int, place: Tensor, kept: KeptImage) -> ImageSelection:
    row, col = place
    layout, indices = kept.layout, kept.indices
    device = col.device  # the record lives with the prompt, as the caller's inputs do
    return ImageSelection(
        image=image,
        prompt=int(row[0]) if row.numel() else -1,
        num_tokens=layout.token_slots.numel(),
        indices=indices.to(device),
        scores=kept.scores,
        grid=kept.grid,
        positions=col[layout.token_slots[indices].to(device)],
        separators=col[kept.separators.to(device)],
        crops=layout.crop[indices].to(device),
        cells=layout.cell[indices].to(device),
        patch_grids=tuple(layout.patch_grids),
        boxes=None if layout.boxes is None else tuple(layout.boxes),
        kind=layout.kind,
    )
