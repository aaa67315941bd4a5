"""One pruning's settings, as every engine takes them: the method, the budget, the position
mode, the method's options and the layout options.

``zooprune.prune`` takes them as keyword arguments, a vLLM model's HF config carries them as
a flat dict (``engine_args``), lmms-eval passes them in ``--model_args`` among the wrapper's
own, and the command line as ``--method``, ``--keep`` / ``--ratio`` and ``--option``. All
of them read and check them here, through :class:`Settings`: one grammar, one set of
names, one check (:meth:`Settings.selector`, which refuses a bad value naming what is
accepted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zooprune.errors import PruneError
from zooprune.pipeline import LAYOUT_OPTIONS, Selector
from zooprune.select import get_method

#: the settings that are not options: the method, the budget and the position mode
GENERAL = ("method", "keep", "ratio", "positions")


@dataclass(frozen=True)
class Settings:
    """What to prune with. ``options`` holds the method's options and the layout options
    together, as a caller gives them; :meth:`selector` tells them apart and checks them."""

    method: str = "zoo"
    keep: int | None = None
    ratio: float | None = None
    positions: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Settings from a flat mapping (an HF config's, ``--model_args``): the
        :data:`GENERAL` keys, and every other key an option.

        Raises:
            PruneError: ``values`` is not a mapping.
        """
        if not isinstance(values, Mapping):
            raise PruneError(f"the zooprune settings must be a dict, got {values!r}")
        values = dict(values)
        general = {name: values.pop(name) for name in GENERAL if name in values}
        return cls(**{"method": "zoo", **general}, options=values)

    @staticmethod
    def names(method: str) -> tuple[str, ...]:
        """Every name a flat mapping may use for ``method``: the general ones, its options
        and the layout options (what lmms-eval's ``--model_args`` tells apart from the
        wrapper's own)."""
        return (*GENERAL, *get_method(method).options, *LAYOUT_OPTIONS)

    def kwargs(self) -> dict[str, Any]:
        """``zooprune.prune(model, **settings.kwargs())``."""
        general = {"method": self.method, "keep": self.keep, "ratio": self.ratio}
        return general | {"positions": self.positions} | self.options

    def as_dict(self) -> dict[str, Any]:
        """The flat mapping :meth:`from_mapping` reads back (what an HF config carries)."""
        general = {"method": self.method, "keep": self.keep, "ratio": self.ratio}
        if self.positions is not None:
            general["positions"] = self.positions
        return general | self.options

    def overridden_by(self, request: Mapping[str, Any]) -> Settings:
        """These settings (a server's) with one request's own over them: the request's
        budget (``keep`` or ``ratio``) replaces the whole budget, its method the method (the
        server's method options then go: they are another method's), and its options and
        layout options are added over the rest.

        Raises:
            PruneError: ``request`` is not a mapping.
        """
        if not isinstance(request, Mapping):
            raise PruneError(f"the zooprune settings must be a dict, got {request!r}")
        given = dict(request)
        method = given.pop("method", self.method)
        if "keep" in given or "ratio" in given:
            keep, ratio = given.pop("keep", None), given.pop("ratio", None)
        else:
            keep, ratio = self.keep, self.ratio
        positions = given.pop("positions", self.positions)
        kept = {
            name: value
            for name, value in self.options.items()
            if name in LAYOUT_OPTIONS or method == self.method
        }
        return Settings(method, keep, ratio, positions, kept | given)

    def selector(self, layout_options: Mapping[str, tuple[str, ...]] = LAYOUT_OPTIONS) -> Selector:
        """The :class:`~zooprune.pipeline.Selector` these settings describe, every value
        checked, for a family accepting ``layout_options``.

        Raises:
            PruneError subclasses naming what is wrong and what is accepted.
        """
        return Selector.build(
            self.method,
            keep=self.keep,
            ratio=self.ratio,
            options=self.options,
            layout_options=layout_options,
        )
