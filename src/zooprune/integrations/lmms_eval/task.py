"""The test bed as an offline lmms-eval task: a folder lmms-eval runs with ``--include_path``.

The folder holds the questions (``test.jsonl``: ``image``, ``question``, ``answer``,
``family``, the format ``zooprune bench --data`` reads too), the images, the task YAML
(``dataset_path: json`` with local ``data_files``) and a small ``utils.py`` whose scoring is
:func:`zooprune.bench.accuracy.is_correct`, so lmms-eval and ``zooprune bench`` score the
same answer alike. The prompt is the processor's chat template over one image then the
question, as ``zooprune bench`` builds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

TASK = "zooprune_testbed"

_YAML = """\
# Written by `zooprune testbed task`: {count} test-bed questions ({families}), split {split}.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: test.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
  num_beams: 1
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""

_UTILS = '''\
"""The zooprune test-bed task's document functions (written by `zooprune testbed task`)."""

from pathlib import Path

from PIL import Image

from zooprune.bench.accuracy import is_correct

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    with Image.open(HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(is_correct(results[0], doc["answer"]))}
'''


def write_testbed_task(
    out: str | Path,
    *,
    split: str = "test",
    families: Sequence[str] | None = None,
    n_per_family: int = 100,
    max_new_tokens: int = 1,
) -> Path:
    """Write the task folder; returns the path of its ``test.jsonl``.

    Args:
        families: test-bed families (default: all seven, as ``zooprune bench`` scores).
        max_new_tokens: the answer length generated (``zooprune bench`` on the test bed: 1).
    """
    # Here, not at the top: the module stays light (no torch) for lmms-eval's task lookup.
    from zooprune.bench.accuracy import testbed_items
    from zooprune.testbed.scenes import FAMILIES

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    families = list(FAMILIES if families is None else families)
    items = testbed_items(n_per_family, split, families)
    lines = []
    for number, item in enumerate(items):
        image = f"images/{split}-{number:05d}.png"
        item.pil().save(out / image)
        row = {"id": number, "image": image, "question": item.question, "answer": item.answer}
        lines.append(json.dumps(row | {"family": item.family}))
    data = out / "test.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (out / "utils.py").write_text(_UTILS)
    (out / f"{TASK}.yaml").write_text(
        _YAML.format(
            count=len(items),
            families=", ".join(families),
            split=split,
            task=TASK,
            max_new_tokens=max_new_tokens,
        )
    )
    return data
