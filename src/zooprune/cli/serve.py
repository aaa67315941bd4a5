"""``zooprune serve``: vLLM's OpenAI-compatible server, serving a model pruned.

The command checks the settings and the model's architecture first (a typo fails here, in a
second, not after the engine has loaded), then replaces itself with vLLM's server, whose
``--hf-overrides`` name the pruned architecture and carry the settings. Everything after
``--`` goes to vLLM unchanged.

With ``--per-request-settings`` a request may carry settings of its own over the server's
(``mm_processor_kwargs={"zooprune": {...}}``, the OpenAI client's ``extra_body``): the flag
passes vLLM's ``--trust-request-mm-kwargs``, without which vLLM refuses any request's
processor kwargs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from zooprune.cli.common import add_method_and_budget, console, fail, settings_from, vllm_missing


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model pruned, with vLLM's OpenAI-compatible server (needs vLLM)",
        description="Serve MODEL with vLLM's OpenAI-compatible server, its visual tokens "
        "pruned at every request. Arguments after -- go to vLLM unchanged.",
        epilog="example: zooprune serve llava-hf/llava-1.5-7b-hf --method zoo --keep 64 "
        "--per-request-settings -- --port 8000 --max-model-len 4096",
    )
    serve.add_argument("model", help="a local folder or hub id of a model vLLM serves")
    add_method_and_budget(serve)
    serve.add_argument(
        "--per-request-settings",
        action="store_true",
        help="let each request carry its own settings over these, as extra_body="
        "{'mm_processor_kwargs': {'zooprune': {'keep': 16}}} (any of method, keep, ratio and "
        "options; {'ratio': 1.0} keeps every token). This passes vLLM's "
        "--trust-request-mm-kwargs, which vLLM requires for any request's processor kwargs "
        "and which lets clients set all of them: for trusted clients",
    )
    serve.add_argument(
        "--print-command", action="store_true", help="print the vLLM command line and exit"
    )
    serve.set_defaults(handler=_serve, passthrough=[])


def server_command(args: argparse.Namespace) -> list[str]:
    """The vLLM server's command line for ``args`` (settings checked; raises PruneError)."""
    from zooprune.integrations.vllm import engine_args

    settings = settings_from(args, default_keep=64)
    overrides = engine_args(args.model, **settings.kwargs())
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(args.model),
        "--hf-overrides",
        json.dumps(overrides["hf_overrides"], separators=(",", ":")),
        *(["--trust-request-mm-kwargs"] if args.per_request_settings else []),
        *args.passthrough,
    ]


def _serve(args: argparse.Namespace) -> int:
    from zooprune.errors import PruneError

    try:
        command = server_command(args)
    except PruneError as error:
        return fail(str(error))
    line = shlex.join(command)
    if args.print_command:
        print(line)
        return 0
    if (status := vllm_missing("zooprune serve")) is not None:
        return status
    console.print(f"[dim]{line}[/dim]", soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached: execv replaces this process
