"""Every family vLLM serves pruned, through the parity suite (``vllm_parity.py``): the
family's HF tester opts in, one engine per class, started in this process."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engines in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from tests.adapters.test_gemma3 import Gemma3Tester  # noqa: E402
from tests.adapters.test_gemma4 import Gemma4Tester  # noqa: E402
from tests.adapters.test_idefics3 import Idefics3Tester  # noqa: E402
from tests.adapters.test_internvl import InternVLTester  # noqa: E402
from tests.adapters.test_llava import LlavaTester  # noqa: E402
from tests.adapters.test_llava_next import AnyResTester, OnevisionTester  # noqa: E402
from tests.adapters.test_mistral3 import Mistral3Tester  # noqa: E402
from tests.adapters.test_qwen2_vl import QwenTester  # noqa: E402
from tests.adapters.test_qwen3_5 import Qwen3_5Tester  # noqa: E402
from tests.adapters.test_qwen3_vl import Qwen3VLTester  # noqa: E402
from tests.integrations.vllm_parity import (  # noqa: E402
    VllmParity,
    VllmTensorParallel,
    VllmVideoParity,
)


# Two tensor-parallel ranks are a minute of CI each: one family, Qwen3-VL, whose patch
# merger is a Linear -> GELU -> Linear like LLaVA's projector (column- then row-sharded).
class TestLlavaOnVllm(VllmParity):
    tester = LlavaTester()


class TestLlavaNextOnVllm(VllmParity):
    tester = AnyResTester("llava-next")


class TestOnevisionOnVllm(VllmVideoParity):
    tester = OnevisionTester("onevision")


class TestQwen2VLOnVllm(VllmVideoParity):
    tester = QwenTester("qwen2-vl")


class TestQwen2_5VLOnVllm(VllmVideoParity):
    tester = QwenTester("qwen2.5-vl")


class TestGemma3OnVllm(VllmParity):  # a pooling projector
    tester = Gemma3Tester()


class TestQwen3VLOnVllm(VllmVideoParity, VllmTensorParallel):  # a patch merger
    tester = Qwen3VLTester("qwen3-vl")


class TestQwen3VLMoeOnVllm(VllmVideoParity):
    tester = Qwen3VLTester("qwen3-vl-moe")


class TestQwen3_5OnVllm(VllmVideoParity):
    tester = Qwen3_5Tester("qwen3.5")


class TestQwen3_5MoeOnVllm(VllmVideoParity):
    tester = Qwen3_5Tester("qwen3.5-moe")


class TestGemma4OnVllm(VllmParity):
    tester = Gemma4Tester()


class TestInternVLOnVllm(VllmParity):
    tester = InternVLTester()


class TestIdefics3OnVllm(VllmParity):
    tester = Idefics3Tester("idefics3")


class TestSmolVLMOnVllm(VllmParity):
    tester = Idefics3Tester("smolvlm")


class TestMistral3OnVllm(VllmParity):
    tester = Mistral3Tester()
