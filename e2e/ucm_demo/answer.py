"""The demo's last step: the operator's own prefill and decode commands answer a question.

The simulated (kwok) nodes run no containers, so the pods the operator created load no model. This
step reads the `vllm serve` command lines the operator generated from the Deployments it created and
runs one prefill and one decode as local processes on this machine (vLLM's CPU build), with the store
volume's mount path mapped to a local directory, plus the router between them; then it asks a
question through the router with the `openai` client, and a second turn that hits the store.

What has to change for a CPU laptop is changed in the open and printed: the model (SmolLM2-135M-
Instruct from a local directory instead of the spec's hub model), TP 1, float32, the CPU backend's
block size, the model's own context length, loopback ports, and the store path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from ucm.serve.models import prepare
from ucm.serve.server import RouterProcess, VllmServer, free_port, start_all

JSON = dict[str, Any]
# flags whose value is replaced (None: the flag and its value are dropped)
_LOCAL_VALUES: dict[str, str | None] = {
    "--tensor-parallel-size": "1",  # one CPU process, no GPUs to split over
    "--dtype": "float32",  # ~4x faster than bf16 on these CPUs (no AVX512-BF16)
    "--block-size": None,  # the CPU attention backend uses 128-token blocks
    "--max-model-len": "8192",  # SmolLM2-135M's trained window
    "--revision": None,  # a local directory has no hub revision
    "--gpu-memory-utilization": None,  # no GPU
    "--host": "127.0.0.1",
}
DOCUMENT = (Path(__file__).resolve().parents[2] / "README.md")
QUESTION = "In one sentence: what does UCM store, and where?"
FOLLOW_UP = "And what does the router do?"


def _container(deployment: JSON) -> JSON:
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


def localise_vllm_args(args: Sequence[str], model: Path, port: int, store_mount: str, store_dir: Path,
                       note: Callable[[str], None]) -> list[str]:
    """The operator's `vllm serve` arguments, made runnable here; each change is reported via `note`."""
    out: list[str] = [str(model)]
    note(f"model {args[0]} -> {model} (SmolLM2-135M-Instruct, offline)")
    i = 1
    while i < len(args):
        flag = args[i]
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
        step = 2 if value is not None else 1
        if flag == "--port":
            out += [flag, str(port)]
        elif flag in _LOCAL_VALUES:
            replacement = _LOCAL_VALUES[flag]
            if replacement is not None:
                out += [flag, replacement]
            if replacement != value:
                note(f"{flag} {value} -> {replacement if replacement is not None else '(dropped)'}")
        elif flag == "--kv-transfer-config" and value is not None:
            config = json.loads(value)
            extra = config.setdefault("kv_connector_extra_config", {})
            path = str(extra.get("store_path", ""))
            if path.startswith(store_mount):
                extra["store_path"] = str(store_dir) + path[len(store_mount):]
                note(f"store_path {path} -> {extra['store_path']} (the store volume, mapped to a local directory)")
            out += [flag, json.dumps(config)]
        else:
            out += [flag] + ([value] if value is not None else [])
        i += step
    return [*out, "--enforce-eager", "--no-enable-prefix-caching"]


def _pool_deployment(deployments: Sequence[JSON], role: str) -> JSON:
    for deployment in deployments:
        if deployment["metadata"].get("labels", {}).get("ucm.dev/role") == role:
            return deployment
    raise RuntimeError(f"the operator created no {role} Deployment")


def _store_mount(container: JSON) -> str:
    for mount in container.get("volumeMounts", []):
        if "store" in mount["name"]:
            return str(mount["mountPath"])
    raise RuntimeError(f"container {container['name']} mounts no store volume")


def _ask(url: str, model: str, messages: list[JSON]) -> tuple[str, float, float]:
    """(answer, time to first token, total) of one streamed chat completion through the router."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0, timeout=300)
    t0 = time.monotonic()
    ttft, parts = 0.0, list[str]()
    # greedy, so both runs answer alike; a 135M model repeats itself without a repetition penalty
    stream = client.chat.completions.create(model=model, messages=cast(Any, messages), max_tokens=48,
                                            temperature=0, stream=True, extra_body={"repetition_penalty": 1.2})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if not parts:
                ttft = time.monotonic() - t0
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts).strip(), ttft, time.monotonic() - t0


def _hits(server: VllmServer) -> int:
    return int(server.metrics().get("vllm:ucm_hit_tokens_total", 0))


def answer_through_local_pair(deployments: Sequence[JSON], served_name: str, workdir: Path,
                              say: Callable[[str], None], register: Callable[[Callable[[], None]], object]) -> None:
    """Run the operator's prefill and decode commands and the router locally; ask two turns."""
    say("The simulated pods above run no containers. To get a real answer, this machine now runs the\n"
        "prefill and decode commands the operator generated (read from its Deployments) as local\n"
        "processes standing in for those pods, plus the router between them:")
    model = prepare("smollm2")
    store_dir = workdir / "store"
    store_dir.mkdir(exist_ok=True)
    servers: dict[str, VllmServer] = {}
    for role in ("prefill", "decode"):
        container = _container(_pool_deployment(deployments, role))
        port = free_port()
        notes: list[str] = []
        args = localise_vllm_args(container["args"], model, port, _store_mount(container), store_dir, notes.append)
        say(f"  {role}: {' '.join(container['command'])} {container['args'][0]} ... ({len(notes)} local changes)")
        for line in notes:
            say(f"      {line}")
        servers[role] = VllmServer(model=model, log_dir=workdir, name=f"local-{role}", port=port,
                                   serve_args=args)
        register(servers[role].stop)
    say("  starting both (a CPU vLLM server loads in 20-60 s) ...")
    start_all(list(servers.values()))
    router = RouterProcess([servers["prefill"].url], [servers["decode"].url], workdir, served_name=served_name)
    register(router.stop)
    router.start()
    say(f"  router: ucm router serve --prefill {servers['prefill'].url} --decode {servers['decode'].url}"
        f" on {router.url}")
    document = DOCUMENT.read_text()[:6000]
    messages: list[JSON] = [
        {"role": "system", "content": "Answer from this document.\n\n" + document},
        {"role": "user", "content": QUESTION},
    ]
    answer, ttft1, total1 = _ask(router.url, served_name, messages)
    say(f"\n  Q: {QUESTION}\n  A: {answer}\n     (turn 1: TTFT {ttft1:.2f} s, {total1:.2f} s in all)")
    time.sleep(1.0)  # connector stats reach /metrics with the engine's next stats update
    before = _hits(servers["prefill"])
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
    answer2, ttft2, total2 = _ask(router.url, served_name, messages)
    time.sleep(1.0)  # connector stats reach /metrics with the engine's next stats update
    hits = _hits(servers["prefill"]) - before
    say(f"\n  Q: {FOLLOW_UP}\n  A: {answer2}\n     (turn 2: TTFT {ttft2:.2f} s, {total2:.2f} s in all; the prefill "
        f"side loaded {hits} prompt tokens from the store instead of recomputing them; "
        f"turn 1's TTFT was {ttft1:.2f} s)")
