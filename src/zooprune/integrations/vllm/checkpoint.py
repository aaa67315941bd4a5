"""Checkpoints saved by transformers 5 for vLLM's stock model classes.

transformers 5 saves a LLaVA's CLIP / SigLIP tower one level flatter than the checkpoints on
the hub (``vision_tower.embeddings...``, not ``vision_tower.vision_model.embeddings...``).
The pruned variants map either layout as they load; vLLM's own classes, which serve the
unpruned baselines of the benchmarks, read only the hub's. These helpers write it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_TOWERS = ("model.vision_tower.", "vision_tower.")


def hub_key(name: str) -> str:
    """``name`` as a hub checkpoint spells it (unchanged outside a flat tower)."""
    for tower in _TOWERS:
        if name.startswith(tower) and not name.startswith(tower + "vision_model."):
            return tower + "vision_model." + name[len(tower) :]
    return name


def in_hub_layout(folder: str | Path) -> bool:
    """Whether every ``*.safetensors`` file of ``folder`` spells its keys as the hub does
    (read from the files' headers: no tensor is loaded)."""
    return not any(_flat_keys(file) for file in Path(folder).glob("*.safetensors"))


def to_hub_layout(folder: str | Path) -> Path:
    """Rewrite the ``*.safetensors`` files of ``folder`` in the hub's layout, in place."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    for file in sorted(folder.glob("*.safetensors")):
        if _flat_keys(file):
            tensors = load_file(file)
            save_file({hub_key(k): v for k, v in tensors.items()}, file, metadata={"format": "pt"})
    return folder


def hub_layout_copy(source: str | Path, destination: str | Path) -> Path:
    """A copy of the model folder ``source`` at ``destination``, in the hub's layout."""
    destination = Path(destination)
    shutil.copytree(source, destination, dirs_exist_ok=True)
    return to_hub_layout(destination)


def _flat_keys(file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(file, "pt") as tensors:
        return any(hub_key(name) != name for name in tensors.keys())
