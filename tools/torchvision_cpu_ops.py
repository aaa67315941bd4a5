"""Lets `import torchvision` succeed on a CPU torch, for the vLLM test environment.

The package index's torchvision wheel is a CUDA build: its compiled operators do not load on
the CPU torch, and its Python side then fails registering fake kernels for `torchvision::nms`
and `torchvision::qnms`, which vLLM imports (through its Pixtral and LLaVA models). Declaring
the two schemas first is enough; nothing in zooprune or in the models it serves runs them.

`make vllm-install` copies this file into the environment's site-packages next to a `.pth`
line that imports it, so every process vLLM spawns declares the schemas before torchvision
loads.
"""

import torch

_LIBRARY = torch.library.Library("torchvision", "DEF")
for _name in ("nms", "qnms"):
    _LIBRARY.define(f"{_name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
