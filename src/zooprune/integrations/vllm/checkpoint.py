"""Checkpoints saved by transformers 5 for vLLM's stock model classes.

transformers 5 saves a LLaVA's CLIP / SigLIP tower one level flatter than the checkpoints on
the hub (``vision_tower.embeddings...``, not ``vision_tower.vision_model.embeddings...``).
The pruned variants map either layout as they load; vLLM's own classes, which serve the
unpruned baselines of the benchmarks, read only the hub's. These helpers write it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

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


def transformers5_experts(
    weights: Iterable[tuple[str, Tensor]], config: Any
) -> Iterator[tuple[str, Tensor]]:
    """Qwen3-VL-MoE's fused experts as vLLM reads them.

    transformers 5 saves ``experts.gate_up_proj`` as ``[E, 2I, H]`` and
    ``experts.down_proj`` as ``[E, H, I]``; the hub's checkpoints (and vLLM's loader) have
    them transposed, ``[E, H, 2I]`` and ``[E, I, H]``. vLLM loads either shape when the
    matrices are square (``2I == H``), silently wrong for the other layout, so the layout is
    read off the shape where it can be, and off the checkpoint's ``transformers_version``
    (5 or later: transformers 5's) where the shape cannot tell.
    """
    text = getattr(config, "text_config", config)
    hidden, inner = text.hidden_size, text.moe_intermediate_size
    saved_by_5 = int(str(getattr(config, "transformers_version", "0")).split(".")[0] or 0) >= 5
    expected = {"gate_up_proj": (2 * inner, hidden), "down_proj": (hidden, inner)}
    for name, tensor in weights:
        part = name.rsplit(".", 1)[-1]
        if ".experts." in name and part in expected and tensor.ndim == 3:
            ours = expected[part]
            square = ours[0] == ours[1]
            if tuple(tensor.shape[1:]) == ours and (saved_by_5 or not square):
                tensor = tensor.transpose(1, 2).contiguous()
            elif tuple(tensor.shape[1:]) != ours[::-1]:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}: neither transformers 5's "
                    f"[E, {ours[0]}, {ours[1]}] nor the hub's [E, {ours[1]}, {ours[0]}]"
                )
        yield name, tensor
