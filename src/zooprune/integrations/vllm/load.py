"""A load-and-fault run against ``zooprune serve``: many concurrent requests mixing the
server's settings and requests' own, images of odd sizes and modes, several images per
prompt, videos, bad settings and malformed requests; then the checks a server operator
cares about.

The run starts ``zooprune serve --per-request-settings`` on a model (by default a tiny
Qwen3-VL with random weights, saved once: images and videos, M-RoPE, DeepStack), sends
every request of the mix (:func:`request_mix`, a function of the seed) from ``concurrency``
threads, ``rounds`` times (from the second round on, vLLM's processor, encoder and prefix
caches serve what they hold), and meanwhile polls ``/health`` and the resident memory of
the server's process tree. Then it stops the server and answers a sample of the accepted
requests again with the offline engine (``LLM.chat``, the same model, template and
settings): each answer must be the server's, token for token.

What it reports: the requests by kind and HTTP status; requests lost (no HTTP answer, or a
5xx); bad requests not answered 400, or answered without zooprune's message where the
settings were the fault; the health checks that failed; whether the engine process
changed; resident memory at the start and end of the load; and the sampled answers that
differ from the offline engine's. A run passes when all of those are zero.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zooprune.integrations.vllm.video_throughput import (
    default_video_config,
    save_default_video_model,
)

#: the mix's kinds and their shares of the requests
KINDS = {
    "image": 0.30,  # one image, odd sizes and modes
    "images": 0.12,  # two or three images in one prompt
    "video": 0.10,  # a video, alone or after an image
    "own settings": 0.25,  # a request's own settings (budgets, methods, options, unpruned)
    "bad settings": 0.12,  # a request's own settings, refused
    "malformed": 0.11,  # a request vLLM itself refuses
}
#: a request's own settings that the server accepts
OWN = [
    {"keep": 2},
    {"keep": 12},
    {"ratio": 0.5},
    {"ratio": 1.0},
    {"method": "grid"},
    {"method": "divprune", "keep": 4},
    {"method": "random", "seed": 5},
    {"method": "pool", "keep": 6},
    {"num_directions": 4},
    {"method": "zoo", "estimator": "zo", "num_directions": 4},
]
#: a request's own settings that are refused, with what the refusal must say
BAD = [
    ({"keep": 0}, "keep must be positive"),
    ({"keep": 1000}, "exceeds image 0"),
    ({"ratio": 2.0}, "ratio must be in (0, 1]"),
    ({"nope": 1}, "has no option 'nope'"),
    ({"method": "fastv"}, "methods that apply"),
    ({"method": "nope"}, "nope"),
    ({"estimator": "exact"}, "use 'jvp' or 'zo'"),
    ({"video_budget": "global"}, "video_budget='global' cannot be served"),
    ({"positions": "compact"}, "positions='compact'"),
    ("seven", "must be a dict"),
]
#: requests vLLM refuses before zooprune sees them
MALFORMED = ("corrupt image", "not an image", "too many images", "too long", "no messages")
#: image sizes (w, h) px and modes: tiny, thin, wide, odd, large
SIZES = [(1, 1), (7, 300), (300, 7), (97, 131), (224, 224), (640, 480), (4000, 3000)]
MODES = ["RGB", "RGBA", "L", "P", "LA", "CMYK"]
#: the pixels the default model's processor resizes every image and frame to lie between:
#: 16 to 64 merged tokens an image, so that every budget of the mix fits every image
PIXELS = (128 * 128, 256 * 256)
#: the server's own settings in the run
SERVER_KEEP = 8
LIMITS = {"image": 3, "video": 1}
MAX_MODEL_LEN = 2048


@dataclass
class LoadConfig:
    model: str | None = None  # None: the tiny Qwen3-VL, saved under cache
    requests: int = 500  # in each round
    rounds: int = 3  # the same mix again: vLLM's caches serve it
    concurrency: int = 32
    sample: int = 40  # accepted answers checked against the offline engine
    new_tokens: int = 6
    seed: int = 0
    cache: str = ".cache/load-model"
    startup_seconds: float = 600.0  # a guard for a server that never comes up
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sent:
    """One request of the mix, and what became of it."""

    index: int
    kind: str
    body: dict[str, Any] | None  # None: a request without a JSON body of the right shape
    own: Any = None  # the request's own zooprune settings, if any
    expect: str = "answer"  # or "refusal"
    message: str = ""  # what a refusal must say (zooprune's refusals)
    status: int | None = None
    reply: Any = None
    seconds: float = 0.0


def save_load_model(folder: str | Path, seed: int = 0) -> Path:
    """The default model: Qwen3-VL's layout at toy size (a 64-wide, 4-layer tower; a
    128-wide, 2-layer language model), random weights, float32, its output layer scaled by
    16 so that a greedy answer hardly ever hinges on float rounding (batches of other
    shapes round otherwise). Saved once."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / f"qwen3-vl-tiny-{seed}"
    if (path / "config.json").is_file():
        return path
    config = default_video_config(vocab_size=512, tower=(64, 4), lm=(128, 2))
    save_default_video_model(
        path, "float32", seed, config, max_pixels=PIXELS[1], min_pixels=PIXELS[0]
    )
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    head = next(name for name in tensors if name.endswith("lm_head.weight"))
    tensors[head] = tensors[head] * 16
    save_file(tensors, weights, metadata={"format": "pt"})
    return path


def chat_template() -> str:
    """A chat template for the model's word-level tokenizer: each message's parts in order,
    an image or video as its vision markers around one placeholder."""
    return (
        "{% for message in messages %}<s> {{ message['role'] }} "
        "{% for part in message['content'] %}"
        "{% if part['type'] in ('image', 'image_url') %}"
        "<|vision_start|><|image_pad|><|vision_end|> "
        "{% elif part['type'] in ('video', 'video_url') %}"
        "<|vision_start|><|video_pad|><|vision_end|> "
        "{% else %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}<s> assistant"
    )


def image_url(picture: Image.Image) -> str:
    fmt = "JPEG" if picture.mode in ("RGB", "L", "CMYK") else "PNG"
    data = io.BytesIO()
    picture.save(data, format=fmt)
    kind = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(data.getvalue()).decode()


def video_url(frames: np.ndarray) -> str:
    """A video as vLLM takes one by URL: its frames as JPEGs, comma-separated."""
    parts = []
    for frame in frames:
        data = io.BytesIO()
        Image.fromarray(frame).save(data, format="JPEG")
        parts.append(base64.b64encode(data.getvalue()).decode())
    return "data:video/jpeg;base64," + ",".join(parts)


def _picture(rng: np.random.Generator) -> Image.Image:
    """A picture of a size and mode from :data:`SIZES` and :data:`MODES`: random blocks of
    at most 64 x 64 (a large one encodes quickly)."""
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    blocks = rng.integers(0, 256, (min(h, 64), min(w, 64), 3), dtype=np.uint8)
    picture = Image.fromarray(blocks).resize((w, h), Image.Resampling.NEAREST)
    return picture.convert(MODES[int(rng.integers(len(MODES)))])


def _words(rng: np.random.Generator, count: int) -> str:
    from zooprune.tiny import WORDS

    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), count))


def request_mix(config: LoadConfig, model: str) -> list[Sent]:
    """The run's requests, a function of the config's seed: each kind in its share
    (:data:`KINDS`), shuffled."""
    rng = np.random.default_rng(config.seed)
    counts = {kind: int(round(share * config.requests)) for kind, share in KINDS.items()}
    counts["image"] += config.requests - sum(counts.values())
    kinds = [kind for kind, count in counts.items() for _ in range(count)]
    rng.shuffle(kinds)
    return [_request(i, kind, rng, config, model) for i, kind in enumerate(kinds)]


def _request(
    index: int, kind: str, rng: np.random.Generator, config: LoadConfig, model: str
) -> Sent:
    def image_part() -> dict:
        return {"type": "image_url", "image_url": {"url": image_url(_picture(rng))}}

    def video_part() -> dict:
        frames = int(rng.choice([2, 4, 6]))
        side = int(rng.choice([128, 160, 224]))
        pixels = rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8)
        return {"type": "video_url", "video_url": {"url": video_url(pixels)}}

    text = {"type": "text", "text": _words(rng, int(rng.integers(3, 30)))}
    parts: list[dict] = [image_part()]
    own: Any = None
    expect, message = "answer", ""
    if kind == "images":
        parts = [image_part() for _ in range(int(rng.integers(2, 4)))]
    elif kind == "video":
        parts = [video_part()] if rng.random() < 0.5 else [image_part(), video_part()]
    elif kind == "own settings":
        own = OWN[int(rng.integers(len(OWN)))]
        if rng.random() < 0.3:
            parts = [video_part()]
    elif kind == "bad settings":
        own, message = BAD[int(rng.integers(len(BAD)))]
        expect = "refusal"
        if own == {"video_budget": "global"}:
            parts = [video_part()]
    elif kind == "malformed":
        expect = "refusal"
        fault = MALFORMED[int(rng.integers(len(MALFORMED)))]
        if fault == "corrupt image":
            parts = [{"type": "image_url", "image_url": {"url": image_url(_picture(rng))[:-40]}}]
        elif fault == "not an image":
            data = base64.b64encode(b"this is not a picture at all").decode()
            parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]
        elif fault == "too many images":
            parts = [image_part() for _ in range(LIMITS["image"] + 1)]
        elif fault == "too long":
            text = {"type": "text", "text": _words(rng, 2 * MAX_MODEL_LEN)}
        elif fault == "no messages":
            body = {"model": model, "max_tokens": config.new_tokens}
            return Sent(index, f"{kind}: {fault}", body, expect=expect)
        kind = f"{kind}: {fault}"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [*parts, text]}],
        "max_tokens": config.new_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    if own is not None:
        body["mm_processor_kwargs"] = {"zooprune": own}
    return Sent(index, kind, body, own, expect, message)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict | None, timeout: float = 600) -> tuple[int | None, Any]:
    """``(status, reply)``: the HTTP status and the decoded body; ``(None, reason)`` where
    no HTTP answer came."""
    data = json.dumps(body).encode() if body is not None else b"{"
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read().decode() or "{}")
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, text
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
        return None, repr(error)


def _health(base: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _resident_mib(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class Watch:
    """Polls ``/health`` and the resident memory of the server's process tree in a
    thread of its own, until stopped."""

    def __init__(self, base: str, pid: int, every: float = 0.5) -> None:
        self.base, self.pid, self.every = base, pid, every
        self.health: Counter[int | None] = Counter()
        self.memory: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.health[_health(self.base)] += 1
            self.memory.append(_resident_mib(_tree(self.pid)))
            self._stop.wait(self.every)


def start_server(model: Path, port: int, log: Path, template: Path) -> subprocess.Popen:
    """``zooprune serve`` on ``model``: keep 8 by default, requests' own settings allowed."""
    command = [
        *(sys.executable, "-m", "zooprune.cli", "serve", str(model)),
        *("--keep", str(SERVER_KEEP), "--per-request-settings", "--"),
        *("--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"),
        *("--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN)),
        *("--chat-template", str(template), "--chat-template-content-format", "openai"),
        *("--limit-mm-per-prompt", json.dumps(LIMITS)),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    with open(log, "w") as sink:
        return subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_until_up(base: str, process: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _health(base) != 200:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not come up:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server and wait for its whole process tree (the engine's memory must be
    free before the offline engine starts)."""
    import psutil

    tree = [psutil.Process(pid) for pid in _tree(process.pid)]
    os.killpg(process.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=60)
    for survivor in alive:
        survivor.kill()
    psutil.wait_procs(alive, timeout=30)
    process.wait()


def send_all(
    base: str, sent: list[Sent], concurrency: int, progress: Callable[[], None] | None = None
) -> None:
    """Every request of ``sent`` from ``concurrency`` threads; each records its status,
    reply and seconds."""

    def one(request: Sent) -> None:
        start = time.perf_counter()
        request.status, request.reply = _post(f"{base}/v1/chat/completions", request.body)
        request.seconds = time.perf_counter() - start
        if progress is not None:
            progress()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, sent))


def _reply_text(reply: Any) -> str:
    return reply if isinstance(reply, str) else json.dumps(reply)


def verdicts(sent: list[Sent]) -> dict[str, list[int]]:
    """The requests that went wrong, by what went wrong (their indices)."""
    wrong: dict[str, list[int]] = {
        "lost (no answer or 5xx)": [],
        "answered where refused was expected": [],
        "refused where an answer was expected": [],
        "refusal without zooprune's message": [],
    }
    for request in sent:
        if request.status is None or request.status >= 500:
            wrong["lost (no answer or 5xx)"].append(request.index)
        elif request.expect == "refusal" and request.status == 200:
            wrong["answered where refused was expected"].append(request.index)
        elif request.expect == "answer" and request.status != 200:
            wrong["refused where an answer was expected"].append(request.index)
        elif request.message and (
            request.status != 400 or request.message not in _reply_text(request.reply)
        ):
            wrong["refusal without zooprune's message"].append(request.index)
    return wrong


def offline_answers(model: Path, template: str, sample: list[Sent], config: LoadConfig) -> list:
    """The offline engine's greedy tokens for each sampled request (same model, template,
    server settings and the request's own)."""
    from vllm import LLM, SamplingParams

    import zooprune.integrations.vllm as zv

    llm = LLM(
        model=str(model),
        enforce_eager=True,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        limit_mm_per_prompt=LIMITS,
        # On a CPU this is the share of the machine's memory the engine takes (92% by
        # default): this process still holds the run's requests.
        gpu_memory_utilization=0.3,
        **zv.engine_args(model, keep=SERVER_KEEP),
    )
    params = SamplingParams(temperature=0, max_tokens=config.new_tokens)
    answers = []
    try:
        for request in sample:
            kwargs = {"mm_processor_kwargs": {"zooprune": request.own}} if request.own else {}
            (out,) = llm.chat(
                request.body["messages"],
                params,
                chat_template=template,
                chat_template_content_format="openai",
                use_tqdm=False,
                **kwargs,
            )
            answers.append(list(out.outputs[0].token_ids))
    finally:
        del llm
    return answers


def run_load(config: LoadConfig, out: str | Path, echo: Callable[[str], None] = print) -> dict:
    """The whole run (see the module's docstring); writes ``load.json`` under ``out`` and
    returns what it holds."""
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(config.model) if config.model else save_load_model(config.cache, config.seed)
    template = out / "template.jinja"
    template.write_text(chat_template())
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = out / "server.log"
    mix = request_mix(config, str(model))
    # The same mix each round: later rounds meet vLLM's caches (processor, encoder, prefix)
    sent = [
        replace(request, index=round_ * len(mix) + request.index)
        for round_ in range(config.rounds)
        for request in mix
    ]
    echo(f"starting zooprune serve on {model} (log: {log})")
    process = start_server(model, port, log, template)
    try:
        wait_until_up(base, process, log, config.startup_seconds)
        engine_before = _tree(process.pid)
        start = time.perf_counter()
        ends = []  # the server's resident MiB after each round
        with Watch(base, process.pid) as watch, tqdm(total=len(sent), desc="requests") as bar:
            for round_ in range(config.rounds):
                send_all(
                    base,
                    sent[round_ * len(mix) : (round_ + 1) * len(mix)],
                    config.concurrency,
                    bar.update,
                )
                ends.append(_resident_mib(_tree(process.pid)))
        seconds = time.perf_counter() - start
        engine_after = _tree(process.pid)
        alive = process.poll() is None and _health(base) == 200
    finally:
        stop_server(process)
    accepted = [r for r in sent if r.status == 200 and r.expect == "answer"]
    rng = np.random.default_rng(config.seed + 1)
    chosen = sorted(rng.choice(len(accepted), min(config.sample, len(accepted)), replace=False))
    sample = [accepted[int(i)] for i in chosen]
    echo(f"answering {len(sample)} sampled requests again with the offline engine")
    offline = offline_answers(model, chat_template(), sample, config)
    differing = [
        r.index
        for r, tokens in zip(sample, offline, strict=True)
        if r.reply["choices"][0]["token_ids"] != tokens
    ]
    result = {
        "config": asdict(config),
        "model": str(model),
        "seconds": seconds,
        "requests": len(sent),
        "rounds": config.rounds,
        "by kind and status": {
            f"{kind} -> {status}": count
            for (kind, status), count in sorted(
                Counter((r.kind, r.status) for r in sent).items(), key=str
            )
        },
        "wrong": verdicts(sent),
        "health": {str(k): v for k, v in watch.health.items()},
        "server alive at the end": alive,
        "engine processes unchanged": engine_before == engine_after,
        "resident MiB": {"after each round": ends, "max": max(watch.memory)},
        "sampled": len(sample),
        "sampled answers differing from the offline engine": differing,
        "latency s": {
            "median": float(np.median([r.seconds for r in accepted])),
            "p95": float(np.percentile([r.seconds for r in accepted], 95)),
        },
    }
    result["passed"] = passed(result)
    (out / "load.json").write_text(json.dumps(result, indent=2))
    return result


def passed(result: dict) -> bool:
    """No request lost or misanswered, health never failed, the engine never changed, and
    every sampled answer the offline engine's."""
    return (
        not any(result["wrong"].values())
        and set(result["health"]) == {"200"}
        and result["server alive at the end"]
        and result["engine processes unchanged"]
        and not result["sampled answers differing from the offline engine"]
    )
