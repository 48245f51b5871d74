"""Acting as the chart's ServiceAccount from outside the cluster.

The operator normally runs in the chart's pod with the ServiceAccount's token mounted. Here (the
demo, the RBAC e2e test) it runs as a local process, so it gets the same identity the same way:
a bound token from the TokenRequest API in a kubeconfig of its own. Nothing about it is admin;
whatever the operator can do with it, the chart's RBAC granted.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from e2e.access import ClusterAccess


def service_account_user(namespace: str, service_account: str) -> str:
    return f"system:serviceaccount:{namespace}:{service_account}"


def write_service_account_kubeconfig(
    admin: ClusterAccess, namespace: str, service_account: str, path: Path, duration: str = "24h"
) -> ClusterAccess:
    """Writes `path`: the admin kubeconfig's cluster (CA and server) with a token for the
    ServiceAccount instead of the admin's credentials; checks that the API server agrees who it
    is, and returns an accessor that runs kubectl/helm as that identity."""
    token = admin.kubectl("-n", namespace, "create", "token", service_account, "--duration", duration).stdout.strip()
    flat = yaml.safe_load(admin.kubectl("config", "view", "--raw", "--flatten", "--minify").stdout)
    cluster = flat["clusters"][0]
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
    access = ClusterAccess.from_kubeconfig(path, admin.bin_dir)
    whoami = access.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout
    if whoami != user:
        raise RuntimeError(f"{path} authenticates as {whoami!r}, expected {user!r}")
    return access
