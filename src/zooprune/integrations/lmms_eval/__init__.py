"""zooprune in lmms-eval: ``--model zooprune`` evaluates any built-in Hugging Face wrapper,
pruned.

This module is what the ``lmms_eval.models`` entry point names, so it stays light: it
imports nothing heavy, since lmms-eval drops every plugin (with only a warning) when one
entry point fails to load. The model lives in :mod:`zooprune.integrations.lmms_eval.model`.

    lmms-eval eval --model zooprune \\
        --model_args base=llava_hf,pretrained=llava-hf/llava-1.5-7b-hf,method=zoo,keep=64 \\
        --tasks mme,pope,gqa
"""

from __future__ import annotations

from typing import Any

MODEL_CLASS = "zooprune.integrations.lmms_eval.model.ZoopruneModel"


def manifests() -> Any:
    """The model manifest lmms-eval registers: ``zooprune`` (a simple class path whose
    ``create_from_arg_string`` returns the pruned base wrapper, chat or simple)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="zooprune", simple_class_path=MODEL_CLASS)
