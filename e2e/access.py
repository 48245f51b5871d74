"""How a test reaches a running cluster: its kubeconfig, server URL and the CLI binaries.

`ClusterAccess` is what the `cluster` fixture hands to tests (LocalCluster extends it). It can
also wrap a cluster started earlier with `make cluster-up` (see from_kubeconfig).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from e2e.binaries import bin_dir as default_bin_dir
from e2e.pki import ClientIdentity, Pki


class ClusterError(RuntimeError):
    """Base class of the harness's errors."""


class CommandFailed(subprocess.CalledProcessError):
    """kubectl/helm exited non-zero; str() includes the command's stderr, which a bare
    CalledProcessError would hide from the test report."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout or ''}\nstderr: {self.stderr or ''}".rstrip()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, pki: Pki, who: ClientIdentity) -> None:
    """A self-contained kubeconfig (certificates embedded) for `who`. JSON is valid YAML and
    every Kubernetes client reads it."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ucm-e2e", "cluster": {"server": server, "certificate-authority-data": _b64(pki.ca_cert)}}],
        "users": [
            {
                "name": who.user,
                "user": {
                    "client-certificate-data": _b64(pki.client_cert(who)),
                    "client-key-data": _b64(pki.client_key(who)),
                },
            }
        ],
        "contexts": [{"name": "ucm-e2e", "context": {"cluster": "ucm-e2e", "user": who.user, "namespace": "default"}}],
        "current-context": "ucm-e2e",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


class ClusterAccess:
    """kubeconfig, server and bin_dir of a running cluster, plus kubectl/helm runners."""

    def __init__(self, kubeconfig: Path, bin_dir: Path, server: str) -> None:
        self.kubeconfig = kubeconfig
        self.bin_dir = bin_dir
        self.server = server

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path, bin_dir: Path | None = None) -> ClusterAccess:
        """Wraps an already running cluster (e.g. `make cluster-up`); server comes from the
        kubeconfig's current context."""
        config = json.loads(kubeconfig.read_text()) if kubeconfig.read_text().lstrip().startswith("{") else None
        if config is None:
            import yaml  # only for a hand-written YAML kubeconfig

            config = yaml.safe_load(kubeconfig.read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        server = next(c["cluster"]["server"] for c in config["clusters"] if c["name"] == context["cluster"])
        return cls(kubeconfig.resolve(), bin_dir or default_bin_dir(require=True), str(server))

    def env(self) -> dict[str, str]:
        """The environment for CLI tools: this cluster's KUBECONFIG, our binaries first on PATH,
        and kubectl's and Helm's caches next to the kubeconfig, so tests never touch ~/.kube or
        ~/.config/helm."""
        helm_home = self.kubeconfig.parent / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_DATA_HOME": str(helm_home / "data"),
            # kubectl's discovery cache is keyed by host:port; a later cluster on a reused port
            # must not see this one's API groups.
            "KUBECACHEDIR": str(self.kubeconfig.parent / "kube-cache"),
        }

    def _run(self, tool: str, args: Sequence[str], check: bool, input: str | None, timeout_s: float) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / tool), *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, env=self.env(), timeout=timeout_s, check=False
        )
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, argv, result.stdout, result.stderr)
        return result

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl against this cluster; raises CommandFailed (with stderr) if check and
        it fails. `input` is passed on stdin (e.g. `kubectl apply -f -`)."""
        return self._run("kubectl", args, check, input, timeout_s)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout_s: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs helm against this cluster (same contract as kubectl)."""
        return self._run("helm", args, check, input, timeout_s)
