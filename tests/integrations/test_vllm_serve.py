"""``zooprune serve``: vLLM's OpenAI-compatible server, started by the command as a user
would, answers a chat request with an image on a prompt shortened to K visual tokens, and
generates what the Hugging Face handle does."""

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

import pytest

from tests.adapters.conformance import random_pictures
from tests.integrations.test_vllm import KEEP, LLAVA_PROMPT, STEPS, hf_reference
from tests.integrations.vllm_models import IMAGE, save_llava

# The tiny tokenizer has no chat template: this one renders the prompt the offline tests use.
TEMPLATE = (
    "<s> user {% for part in messages[0]['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% else %}<image> {% endif %}{% endfor %}"
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_llava(tmp_path_factory.mktemp("llava"))
    template = path / "template.jinja"
    template.write_text(TEMPLATE)
    port = free_port()
    command = [
        *(sys.executable, "-m", "zooprune.cli", "serve", str(path), "--keep", str(KEEP)),
        *("--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"),
        *("--enforce-eager", "--max-model-len", "512", "--chat-template", str(template)),
        *("--chat-template-content-format", "openai"),
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
        yield base, path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_the_server_answers_on_a_shortened_prompt_what_the_hf_handle_does(server):
    from transformers import AutoProcessor

    base, path = server
    (picture,) = random_pictures(11, [(52, 60)])
    png = io.BytesIO()
    picture.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    answer = call(
        f"{base}/v1/chat/completions",
        {
            "model": str(path),
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "what is in the image ?"},
                    ],
                }
            ],
            "max_tokens": STEPS,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    processor = AutoProcessor.from_pretrained(path)
    full = processor(images=[picture], text=[LLAVA_PROMPT], return_tensors="pt")["input_ids"][0]
    visual = int((full == IMAGE).sum())
    assert visual > KEEP
    assert answer["usage"]["prompt_tokens"] == len(full) - visual + KEEP
    assert answer["prompt_token_ids"].count(IMAGE) == KEEP
    ((_, _, tokens),) = hf_reference(path, LLAVA_PROMPT, [picture])
    assert answer["choices"][0]["token_ids"] == tokens
