"""Acting as the chart's ServiceAccount from outside the cluster.

The operator normally runs in the chart's pod with the ServiceAccount's token mounted. Here (the
demo, the RBAC e2e test) it runs as a local process, so it gets the same identity the same way:
a bound token from the TokenRequest API in a kubeconfig of its own. Nothing about it is admin;
whatever the operator can do with it, the chart's RBAC granted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml


def _kubectl(kubectl: Path, kubeconfig: Path, *args: str) -> str:
    result = subprocess.run([str(kubectl), *args], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, KUBECONFIG=str(kubeconfig)))
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def service_account_user(namespace: str, service_account: str) -> str:
    return f"system:serviceaccount:{namespace}:{service_account}"


def write_service_account_kubeconfig(
    kubectl: Path, admin_kubeconfig: Path, namespace: str, service_account: str, path: Path,
    duration: str = "24h",
) -> Path:
    """Writes `path`: the admin kubeconfig's cluster (CA and server) with a token for the
    ServiceAccount instead of the admin's credentials, and checks the API server agrees who it is."""
    token = _kubectl(kubectl, admin_kubeconfig, "-n", namespace, "create", "token", service_account,
                     "--duration", duration).strip()
    admin = yaml.safe_load(_kubectl(kubectl, admin_kubeconfig, "config", "view", "--raw", "--flatten", "--minify"))
    cluster = admin["clusters"][0]
    user = service_account_user(namespace, service_account)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": user,
                                                      "namespace": namespace}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    whoami = _kubectl(kubectl, path, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    if whoami != user:
        raise RuntimeError(f"{path} authenticates as {whoami!r}, expected {user!r}")
    return path
