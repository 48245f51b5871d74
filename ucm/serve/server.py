"""A real `vllm serve` process (vLLM's CPU build) on a loopback port, optionally with UCMConnector.

One class owns the recipe every caller shares (tests, `ucm bench serve`, the demo): float32, vLLM's
own prefix cache off unless asked for (so a hit can only come from the connector), eager mode (no
compile time at start-up), one core's worth of OpenMP threads so two servers run side by side, and a
bounded KV cache. A server's stdout/stderr go to a log file whose tail is part of every start-up
error, and the process is its own group, killed whole on stop and when its owner dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ucm.process import die_with_parent

# vLLM only logs its own loggers by default; this adds `ucm` so the connector's start-up line
# (store path and cache identity) is in every server log.
_LOGGING_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [%(name)s] %(message)s"}},
    "handlers": {"stream": {"class": "logging.StreamHandler", "formatter": "plain",
                            "stream": "ext://sys.stdout"}},
    "loggers": {
        "vllm": {"handlers": ["stream"], "level": "INFO", "propagate": False},
        "ucm": {"handlers": ["stream"], "level": "INFO", "propagate": False},
    },
}


class ServerError(RuntimeError):
    """A server did not start or answer; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ucm_transfer_config(role: str, store_path: str | Path, model_id: str, **extra: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` of UCMConnector in `role` on `store_path`."""
    return {
        "kv_connector": "UCMConnector",
        "kv_connector_module_path": "ucm.connector",
        "kv_role": role,
        "kv_connector_extra_config": {"store_path": str(store_path), "model_id": model_id, **extra},
    }


class LoopbackProcess:
    """What a vLLM server and the router share: a child in its own process group on a loopback
    port, its output in `<log_dir>/<name>.log` (whose tail is in every start-up error), stopped
    whole. Subclasses are dataclasses that declare these fields."""

    name: str
    log_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None
    stop_grace_s = 15.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        if self.process is not None:
            raise ServerError(f"{self.name}: already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=die_with_parent,
            )

    def _wait_answering(self, path: str, timeout_s: float, poll_s: float) -> None:
        """Until GET `path` answers 200; raises with the log's tail if the child exits first."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"{self.name} exited with code {code} during start-up; log "
                                  f"{self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(poll_s)
        raise ServerError(f"{self.name} not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
                          f"{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.url)

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process_group(process, self.stop_grace_s)


@dataclass
class VllmServer(LoopbackProcess):
    model: Path
    log_dir: Path
    name: str = "vllm"
    served_name: str = "model"
    kv_transfer_config: Mapping[str, Any] | None = None
    prefix_caching: bool = False
    dtype: str = "float32"
    max_model_len: int = 8192
    kv_cache_gib: int = 2
    cpu_threads: int = 1
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    # A complete `vllm serve` command line (everything after `serve`) used as given, e.g. one the
    # operator generated; the fields above then only set the environment.
    serve_args: Sequence[str] | None = None
    process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        if self.serve_args is not None:
            return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *self.serve_args]
        argv = [
            sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(self.model),
            "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", self.served_name,
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--enforce-eager",
            "--max-num-seqs", "8",
            "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
        ]
        if self.kv_transfer_config is not None:
            argv += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return argv + list(self.extra_args)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logging_config = self.log_dir / f"{self.name}.logging.json"
        logging_config.write_text(json.dumps(_LOGGING_CONFIG))
        env.update({
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "OMP_NUM_THREADS": str(self.cpu_threads),
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_LOGGING_CONFIG_PATH": str(logging_config),
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env)
        return env

    def start(self) -> VllmServer:
        self._spawn(self.argv(), self.child_env())
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> VllmServer:
        """Block until /health answers 200; a server that exits first raises with its log's tail."""
        self._wait_answering("/health", timeout_s, poll_s=0.5)
        return self

    def wait_exit(self, timeout_s: float = 300.0) -> int:
        """For a server expected to fail: its exit code (raises if it is still running)."""
        assert self.process is not None, "start() first"
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise ServerError(f"{self.name} still running after {timeout_s:.0f} s") from None

    def __enter__(self) -> VllmServer:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process_group(process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after `grace_s`; the group is killed in any case,
    because a vLLM front end's engine core is a child in the same group and must not outlive it."""
    if process is None:
        return
    if process.poll() is None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def scrape_metrics(url: str) -> dict[str, float]:
    """Every sample of `url`/metrics summed by metric name (labels dropped): counters across engines."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


def start_all(servers: Sequence[VllmServer], timeout_s: float = 300.0) -> None:
    """Start servers together (they load in parallel) and wait for all; stops them all on failure."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout_s)
    except BaseException:
        for server in servers:
            server.stop()
        raise


@dataclass
class RouterProcess(LoopbackProcess):
    """`ucm router serve` in front of static prefill and decode URLs, as its own process group."""

    prefill: Sequence[str]
    decode: Sequence[str]
    log_dir: Path
    served_name: str = "model"
    name: str = "router"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    stop_grace_s = 10.0

    def start(self, timeout_s: float = 30.0) -> RouterProcess:
        argv = [sys.executable, "-m", "ucm", "router", "serve", "--model", self.served_name,
                "--host", "127.0.0.1", "--port", str(self.port)]
        for url in self.prefill:
            argv += ["--prefill", url]
        for url in self.decode:
            argv += ["--decode", url]
        self._spawn(argv)
        try:
            self._wait_answering("/v1/models", timeout_s, poll_s=0.2)
        except ServerError:
            self.stop()
            raise
        return self
