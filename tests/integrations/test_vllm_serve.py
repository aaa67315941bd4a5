"""``zooprune serve``: vLLM's OpenAI-compatible server, started by the command as a user
would, answers a chat request with an image on a prompt shortened to K visual tokens, and
generates what the Hugging Face handle does, at the server's settings and at a request's
own, and answers bad settings with a 400 (LLaVA, driven by its HF tester)."""

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
from tests.adapters.test_llava import LlavaTester
from tests.integrations.vllm_parity import KEEP, OWN, PER_REQUEST, STEPS, TOP, hf_reference

QUESTION = "what is in the image ?"
#: projector kind -> its family's tester
FAMILIES: dict[str, FamilyTester] = {"mlp": LlavaTester()}
# The HTTP path is the same for every family (the processor runs in the API server as it
# runs offline): Qwen3-VL's patch merger is served over HTTP by the load-and-fault run
# (test_vllm_load.py), whose answers, requests' own settings among them, are the offline
# engine's; the parity suite compares the offline engine with the HF handle, family by
# family.


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
        *(*options, "--per-request-settings"),
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


def image_url(picture) -> str:
    png = io.BytesIO()
    picture.save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def chat(server, picture, own: dict | None = None) -> dict:
    """The server's greedy answer to the question on ``picture`` (its token ids and first
    log-probabilities with it); ``own``: the request's own zooprune settings."""
    base, path, tester = server
    # As the HF reference: a placeholder token generated as text would match no image.
    vocabulary = tester.vllm_hf_processor(path).tokenizer.vocab_size
    allowed = [i for i in range(vocabulary) if i not in tester.banned]
    content = [
        {"type": "image_url", "image_url": {"url": image_url(picture)}},
        {"type": "text", "text": QUESTION},
    ]
    body = {
        "allowed_token_ids": allowed,
        "model": str(path),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": STEPS,
        "temperature": 0,
        "return_token_ids": True,
        "logprobs": True,
        "top_logprobs": TOP,
        "return_tokens_as_token_ids": True,
    }
    if own is not None:  # the OpenAI client's extra_body puts it here
        body["mm_processor_kwargs"] = {"zooprune": own}
    return call(f"{base}/v1/chat/completions", body)


def hf_of(server) -> tuple:
    _, path, tester = server
    dtype = getattr(torch, tester.vllm_dtype)
    return tester.load(path, dtype=dtype), tester.vllm_hf_processor(path)


def check_answer(answer: dict, reference: tuple, tester: FamilyTester) -> None:
    """The prompt the server ran, and counted, is the one the HF handle pruned, and the
    answer is the HF handle's."""
    _, _, tokens, pruned, _ = reference
    assert answer["prompt_token_ids"] == tester.vllm_served_prompt(pruned)
    assert answer["usage"]["prompt_tokens"] == len(pruned)
    first = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    first = {int(t["token"].split(":")[1]): SimpleNamespace(logprob=t["logprob"]) for t in first}
    generated = answer["choices"][0]["token_ids"]
    assert tokens.agrees_with(SimpleNamespace(token_ids=generated, logprobs=[first]))


def test_the_server_answers_on_a_shortened_prompt_what_the_hf_handle_does(server):
    tester = server[2]
    (picture,) = random_pictures(11, [tester.vllm_picture_size])
    answer = chat(server, picture)
    ((kept, *rest),) = hf_reference(tester, hf_of(server), prompt_of(tester), [[picture]])
    assert len(kept[0]) == KEEP
    check_answer(answer, (kept, *rest), tester)


def test_each_request_is_served_by_its_own_settings_and_bad_ones_get_a_400(server):
    tester = server[2]
    (picture,) = random_pictures(12, [tester.vllm_picture_size])
    hf = hf_of(server)
    # Three K (the server's, and two of the request's own, one with another method) and
    # none pruned, the same image each time: each is the HF handle's at its settings.
    for name, method, budget in PER_REQUEST:
        answer = chat(server, picture, OWN[name])
        (reference,) = hf_reference(tester, hf, prompt_of(tester), [[picture]], method, budget)
        check_answer(answer, reference, tester)
    # A bad value is the request's own error, with zooprune's message naming the option;
    # the server goes on serving.
    refusals = [
        ({"keep": 0}, "keep must be positive"),
        ({"method": "zoo", "num_directions": -1}, "num_directions"),
        ({"method": "nope"}, "nope"),
        ({"keep": 10**6}, "exceeds image 0"),
    ]
    for own, message in refusals:
        with pytest.raises(urllib.error.HTTPError) as refused:
            chat(server, picture, own)
        assert refused.value.code == 400
        assert message in refused.value.read().decode()
    answer = chat(server, picture)
    ((kept, *rest),) = hf_reference(tester, hf, prompt_of(tester), [[picture]])
    check_answer(answer, (kept, *rest), tester)
