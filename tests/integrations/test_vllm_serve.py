"""``zooprune serve``: vLLM's OpenAI-compatible server, started by the command as a user
would, answers a chat request with an image on a prompt shortened to K visual tokens, and
generates what the Hugging Face handle does: one family per projector kind (LLaVA's MLP,
Qwen3-VL's patch merger, Gemma 3's pooling projector), each driven by its HF tester."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
import torch

from tests.adapters.conformance import FamilyTester, random_pictures
from tests.adapters.test_gemma3 import Gemma3Tester
from tests.adapters.test_llava import LlavaTester
from tests.adapters.test_qwen3_vl import Qwen3VLTester
from tests.integrations.vllm_parity import KEEP, STEPS, TOP, hf_reference

QUESTION = "what is in the image ?"
#: projector kind -> its family's tester
FAMILIES: dict[str, FamilyTester] = {
    "mlp": LlavaTester(),
    "merger": Qwen3VLTester("qwen3-vl"),
    "pooled": Gemma3Tester(),
}


def prompt_of(tester: FamilyTester) -> str:
    """The one-image prompt the offline tests use, the question last."""
    prompt = tester.vllm_prompt
    assert prompt.endswith(f" {QUESTION}")
    return prompt


def template_for(prompt: str) -> str:
    """The tiny tokenizers have no chat template: this one renders ``prompt`` from a chat
    message holding one image and the question."""
    head = prompt[: -len(QUESTION)]
    return (
        head + "{% for part in messages[0]['content'] %}{% if part['type'] == 'text' %}"
        "{{ part['text'] }}{% endif %}{% endfor %}"
    )


STARTUP_SECONDS = 300  # a liveness guard for a hung server, not a performance bound


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


@pytest.fixture(scope="module", params=list(FAMILIES))
def server(request, tmp_path_factory):
    tester = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)  # the parity suite's weights (tests/integrations/vllm_parity.py)
    path = tester.vllm_build(folder)
    dtype = tester.vllm_dtype
    template = path / "template.jinja"
    template.write_text(template_for(prompt_of(tester)))
    port = free_port()
    # The HF reference's settings: the tester's quick zoo options.
    options = [f"--option={name}={value}" for name, value in tester.fast.items()]
    command = [
        *(sys.executable, "-m", "zooprune.cli", "serve", str(path), "--keep", str(KEEP)),
        *options,
        *("--", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype),
        *("--enforce-eager", "--max-model-len", "1024", "--chat-template", str(template)),
        *("--chat-template-content-format", "openai", "--limit-mm-per-prompt"),
        '{"image": 1, "video": 0}',
    ]
    log = path / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()}")
            try:
                call(f"{base}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not come up:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield base, path, tester
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_the_server_answers_on_a_shortened_prompt_what_the_hf_handle_does(server):
    base, path, tester = server
    prompt = prompt_of(tester)
    (picture,) = random_pictures(11, [tester.vllm_picture_size])
    png = io.BytesIO()
    picture.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    # As the HF reference: a placeholder token generated as text would match no image.
    vocabulary = tester.vllm_hf_processor(path).tokenizer.vocab_size
    allowed = [i for i in range(vocabulary) if i not in tester.banned]
    answer = call(
        f"{base}/v1/chat/completions",
        {
            "allowed_token_ids": allowed,
            "model": str(path),
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],
            "max_tokens": STEPS,
            "temperature": 0,
            "return_token_ids": True,
            "logprobs": True,
            "top_logprobs": TOP,
            "return_tokens_as_token_ids": True,
        },
    )
    generated = answer["choices"][0]["token_ids"]
    hf = (
        tester.load(path, dtype=getattr(torch, tester.vllm_dtype)),
        tester.vllm_hf_processor(path),
    )
    ((kept, _, tokens, pruned, _),) = hf_reference(tester, hf, prompt, [[picture]])
    assert len(kept[0]) == KEEP
    # The prompt the server ran, and counted, is the one the HF handle pruned.
    assert answer["prompt_token_ids"] == tester.vllm_served_prompt(pruned)
    assert answer["usage"]["prompt_tokens"] == len(pruned)
    first = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    first = {int(t["token"].split(":")[1]): SimpleNamespace(logprob=t["logprob"]) for t in first}
    assert tokens.agrees_with(SimpleNamespace(token_ids=generated, logprobs=[first]))
