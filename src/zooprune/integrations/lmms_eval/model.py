"""``--model zooprune``: a built-in lmms-eval wrapper whose Hugging Face model is pruned.

``--model_args base=NAME,...`` names the wrapper (``llava_hf``, ``qwen2_5_vl``,
``qwen2_vl``, ``internvl_hf``, ``gemma3``, ...: any that keeps the Hugging Face model in
``self.model`` and calls its ``generate``). The plugin builds that wrapper with the
arguments that are its own, calls ``zooprune.prune(self.model, method, keep= | ratio=,
**options)`` on the model it loaded (the same call and selection as everywhere else) and
evaluates it. Zooprune's arguments: ``method`` (default ``zoo``), ``keep`` or ``ratio``,
``positions``, the method's options (``estimator=zo``, ...) and the family's layout
options (``crop_budget=global``, ...).

``base=vllm`` evaluates through lmms-eval's vLLM wrapper instead, at serving speed: its
engine serves ``model`` with zooprune's vLLM plugin (the settings become the engine's
``hf_overrides``, :func:`zooprune.integrations.vllm.engine_args`), and every other
argument goes to the wrapper and on to ``vllm.LLM`` as lmms-eval passes it. vLLM's engine
may run in another process, so this base logs no kept counts (``zooprune bench --engine
vllm`` reports them).

Two lmms-eval habits are overridden, so that a result is never a silent failure:
- the stock wrappers catch exceptions from ``generate()`` and score an empty answer, and
  lmms-eval exits 0 after an error it catches: a refused pruning call or a bad option
  therefore raises :class:`EvaluationAborted`, a ``SystemExit`` with zooprune's message,
  which ends the run with exit status 1;
- what was kept is logged next to lmms-eval's own figures: after each task the wrapper
  adds a record to lmms-eval's throughput log, so ``results["throughput"]`` holds
  ``avg_zooprune_images``, ``avg_zooprune_kept_tokens``, ``avg_zooprune_visual_tokens``
  and ``avg_zooprune_select_seconds`` (sums per task, averaged over tasks: their ratios to
  ``avg_zooprune_images`` are exact per-image means; ``zooprune report`` computes them).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import transformers
from lmms_eval import utils
from lmms_eval.api.model import lmms
from lmms_eval.models import get_model
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from transformers import AutoConfig

import zooprune
import zooprune.integrations.vllm as zv
from zooprune.record import Selection
from zooprune.settings import Settings

#: lmms-eval's vLLM wrappers: the base whose engine zooprune's vLLM plugin prunes
VLLM_BASES = ("lmms_eval.models.chat.vllm", "lmms_eval.models.simple.vllm")


class EvaluationAborted(SystemExit):
    """Ends an lmms-eval run with zooprune's message and exit status 1.

    A ``SystemExit``, because lmms-eval's wrappers and command line catch ``Exception``:
    a pruning error would otherwise be scored as an empty answer, and the run exit 0.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"zooprune: {message}")


class ZoopruneModel(lmms):
    """What ``--model zooprune`` resolves to. Never an instance itself:
    :meth:`create_from_arg_string` returns the pruned base wrapper (chat or simple, as the
    base is)."""

    is_simple = True

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> lmms:
        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return create_pruned(args, extra)


def create_pruned(args: dict[str, Any], extra: dict[str, Any] | None = None) -> lmms:
    """The ``base`` wrapper built from its own ``args`` and ``extra`` (lmms-eval's batch
    size, device), its model pruned with the rest. Every value is checked before the
    model loads.

    Raises:
        EvaluationAborted: naming what is wrong and what is accepted.
    """
    args = dict(args)
    base_name = args.pop("base", None)
    if base_name is None or base_name == "zooprune":
        raise EvaluationAborted(
            "name the lmms-eval wrapper to prune in --model_args, e.g. base=llava_hf"
        )
    try:
        base = get_model(base_name)
    except Exception as error:  # noqa: BLE001 (lmms-eval's own lookup error, passed on)
        raise EvaluationAborted(f"base={base_name!r}: {error}") from None
    method = args.get("method", "zoo")
    try:
        ours = Settings.names(method)
    except zooprune.PruneError as error:
        raise EvaluationAborted(str(error)) from None
    settings = Settings.from_mapping(settings_from_model_args(args, method))
    args = {k: v for k, v in args.items() if k not in ours}
    if base.__module__ in VLLM_BASES:
        return _served(base, settings, args, extra or {})
    takes = _parameters(base)
    unknown = sorted(set(args) - takes)
    if unknown:
        options = ", ".join(zooprune.METHODS[method].options) or "none"
        raise EvaluationAborted(
            f"unknown model_args {', '.join(unknown)}; zooprune takes base, {', '.join(ours)} "
            f"(method {method!r}'s options: {options}); "
            f"{base_name} takes {', '.join(sorted(takes))}"
        )
    try:  # the method, its options and the budget, before any weight loads
        settings.selector()
    except zooprune.PruneError as error:
        raise EvaluationAborted(str(error)) from None
    _check_against_the_model(base, args, settings)
    return _pruned_class(base)(zooprune_settings=settings, **args, **(extra or {}))


def _check_against_the_model(base: type, args: dict[str, Any], settings: Settings) -> None:
    """What only the model's family can refuse (``positions``, a layout option it lacks, a
    method it cannot serve), refused before any weight loads: the settings are applied to
    the model built from its config on the meta device (no memory, no weights), then
    removed. A config that cannot be read here, without the network, is checked once the
    model loads instead."""
    pretrained = args.get("pretrained", _default(base, "pretrained"))
    try:
        config = AutoConfig.from_pretrained(pretrained, local_files_only=True)
        model_class = getattr(transformers, config.architectures[0])
        with torch.device("meta"):
            model = model_class(config)
    except Exception:  # noqa: BLE001 (no config here to build from: checked after the load)
        return
    try:
        zooprune.prune(model, **settings.kwargs()).remove()
    except zooprune.PruneError as error:
        raise EvaluationAborted(str(error)) from None


def _default(base: type, name: str) -> Any:
    """The default of ``base.__init__``'s parameter ``name`` (None without one)."""
    parameter = inspect.signature(base.__init__).parameters.get(name)
    return None if parameter is None or parameter.default is parameter.empty else parameter.default


def settings_from_model_args(args: dict[str, Any], method: str) -> dict[str, Any]:
    """The zooprune settings among ``args`` as lmms-eval parsed ``--model_args``, read back
    to what was meant: lmms-eval hands ``None`` over as the string ``"None"`` and a
    negative integer as a float (``keep=-5`` as -5.0); an integral float is read as the
    int."""

    def meant(value: Any) -> Any:
        if value == "None":
            return None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    ours = Settings.names(method)
    return {name: meant(value) for name, value in args.items() if name in ours}


def _served(base: type, settings: Settings, args: dict[str, Any], extra: dict[str, Any]) -> lmms:
    """lmms-eval's vLLM wrapper whose engine serves the model pruned: the settings become
    the engine's ``hf_overrides`` (checked, with the model's architecture, before any
    engine starts); the wrapper's other arguments pass through to it and to vLLM."""
    if "hf_overrides" in args:
        raise EvaluationAborted(
            "base=vllm: zooprune writes the engine's hf_overrides; give the pruning "
            "settings as model_args (method, keep or ratio, options) instead"
        )
    model = args.get("model", _default(base, "model"))
    try:
        pruning = zv.engine_args(model, **settings.kwargs())
    except zooprune.PruneError as error:
        raise EvaluationAborted(str(error)) from None
    return base(**args, **pruning, **extra)


def _parameters(base: type) -> set[str]:
    """The keyword arguments ``base.__init__`` names (its ``**kwargs`` aside)."""
    params = inspect.signature(base.__init__).parameters.values()
    return {
        p.name
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


@functools.cache
def _pruned_class(base: type) -> type:
    """``base`` with :class:`_Pruned` in front: the same wrapper, its model pruned."""
    return type(f"Zooprune{base.__name__}", (_Pruned, base), {"__module__": __name__})


class _Pruned:
    """Prunes the wrapper's model once built, stops the run on a refused call, and logs
    what each task kept."""

    def __init__(self, *, zooprune_settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        try:
            self.zooprune_handle = zooprune.prune(self.model, **zooprune_settings.kwargs())
        except zooprune.PruneError as error:
            raise EvaluationAborted(str(error)) from None
        self.zooprune_handle.observe(self._zooprune_observe)
        self._zooprune_kept = _Tally()

    def _zooprune_observe(self, selection: Selection | None, error: Exception | None) -> None:
        if error is not None:
            raise EvaluationAborted(str(error)) from error
        self._zooprune_kept.add(selection)

    def generate_until(self, requests: list) -> list:
        try:
            return super().generate_until(requests)
        finally:
            self._zooprune_kept.log()


class _Tally:
    """What the pruned calls of one task kept, logged as one lmms-eval metrics record."""

    def __init__(self) -> None:
        self.images = self.kept = self.total = 0
        self.seconds = 0.0

    def add(self, selection: Selection) -> None:
        self.images += len(selection.images)
        self.kept += selection.kept
        self.total += selection.total
        self.seconds += selection.select_seconds

    def log(self) -> None:
        if not self.images:
            return
        log_metrics(
            total_elapsed_time=0.0,
            total_gen_tokens=0,
            avg_speed=0.0,
            additional_metrics={
                "zooprune_images": self.images,
                "zooprune_kept_tokens": self.kept,
                "zooprune_visual_tokens": self.total,
                "zooprune_select_seconds": self.seconds,
            },
        )
        self.__init__()
