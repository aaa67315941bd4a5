"""``zooprune bench --engine vllm``: the accuracy harness's questions answered by vLLM.

One engine per condition (the budget is part of the model's config), started when the
harness reaches the condition and shut down at the next; the unpruned condition runs
vLLM's stock class. Answers are decoded with the model's own processor, as the Hugging
Face path decodes them, so the two engines' predictions compare string for string.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zooprune.bench.accuracy import Item, prompt_for
from zooprune.integrations.vllm.checkpoint import hub_layout_copy, in_hub_layout


class VllmAnswerer:
    """An :data:`~zooprune.bench.accuracy.Answerer` over a vLLM engine.

    Args:
        model: the model folder (any layout transformers 5 saves or the hub holds).
        dtype: the engine's dtype; float32 to compare with the Hugging Face path.
        engine_options: further ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        prompt_template: str | None = None,
        max_new_tokens: int = 1,
        dtype: str = "float32",
        **engine_options: Any,
    ) -> None:
        from transformers import AutoProcessor

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM's stock class (the unpruned condition) reads the hub's layout only: a
        # transformers 5 save is served from a rewritten copy, any other folder as it is.
        self.path = Path(model)
        self._scratch = None
        if not in_hub_layout(self.path):
            self._scratch = tempfile.TemporaryDirectory(prefix="zooprune-vllm-")
            self.path = hub_layout_copy(self.path, Path(self._scratch.name) / "model")
        self.processor = AutoProcessor.from_pretrained(self.path)
        self.image_token_id = self.processor.tokenizer.convert_tokens_to_ids(
            getattr(self.processor, "image_token", "<image>")
        )
        self.prompt_template = prompt_template
        self.max_new_tokens = max_new_tokens
        self.engine_options = {
            "dtype": dtype,
            "limit_mm_per_prompt": {"image": 1},
            "enforce_eager": True,
            "seed": 0,
            **engine_options,
        }
        self._condition: tuple | None = None
        self._llm: Any = None

    def __call__(
        self,
        items: Sequence[Item],
        method: str | None,
        ratio: float | None,
        options: dict[str, Any],
    ) -> tuple[list[str], list[int]]:
        from vllm import SamplingParams

        condition = (method, ratio, tuple(sorted(options.items())))
        if condition != self._condition:
            self._start(method, ratio, options)
            self._condition = condition
        requests = [
            {
                "prompt": prompt_for(self.processor, item.question, self.prompt_template),
                "multi_modal_data": {"image": item.pil()},
            }
            for item in items
        ]
        params = SamplingParams(max_tokens=self.max_new_tokens, temperature=0)
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        predictions = self.processor.batch_decode(
            [list(out.outputs[0].token_ids) for out in outputs], skip_special_tokens=True
        )
        kept = (
            []
            if method is None
            else [out.prompt_token_ids.count(self.image_token_id) for out in outputs]
        )
        return predictions, kept

    def _start(self, method: str | None, ratio: float | None, options: dict[str, Any]) -> None:
        from vllm import LLM

        import zooprune.integrations.vllm as zv

        self.close()
        pruning = (
            {} if method is None else zv.engine_args(self.path, method, ratio=ratio, **options)
        )
        self._llm = LLM(model=str(self.path), **self.engine_options, **pruning)

    def close(self) -> None:
        """Shut the current engine down (the next condition starts its own)."""
        if self._llm is not None:
            self._llm = None
            gc.collect()
