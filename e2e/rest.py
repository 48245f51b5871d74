"""A minimal HTTPS client for the harness's own API calls (health, node registration).

The harness talks to the API server before and without the `kubernetes` package: a handful of
JSON requests with the admin client certificate need nothing but the standard library, and keep
start-up free of that package's import time.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
import urllib.request
from typing import Any

from e2e.pki import ClientIdentity, Pki


class RestError(RuntimeError):
    """A request got an unexpected status; the message has the method, path, status and body."""


class RestClient:
    def __init__(self, server: str, pki: Pki, who: ClientIdentity, timeout_s: float = 10.0) -> None:
        url = urllib.parse.urlsplit(server)
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or 443
        self._timeout = timeout_s
        self._context = ssl.create_default_context(cafile=str(pki.ca_cert))
        self._context.load_cert_chain(str(pki.client_cert(who)), str(pki.client_key(who)))

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._context)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get_status(self, path: str) -> int:
        return self.request("GET", path)[0]

    def get_json(self, path: str) -> Any:
        status, data = self.request("GET", path)
        if status != 200:
            raise RestError(f"GET {path}: HTTP {status}: {data[:500]!r}")
        return json.loads(data)

    def create(self, path: str, obj: dict[str, Any]) -> Any:
        status, data = self.request("POST", path, obj)
        if status not in (200, 201):
            raise RestError(f"POST {path} ({obj.get('kind')} {obj['metadata'].get('name')}): HTTP {status}: {data[:500]!r}")
        return json.loads(data)

    def ready_node_names(self) -> set[str]:
        nodes = self.get_json("/api/v1/nodes")["items"]
        return {
            n["metadata"]["name"]
            for n in nodes
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        }

    @staticmethod
    def plain_get(url: str, timeout_s: float = 2.0) -> bytes:
        """GET a health endpoint. HTTPS is not verified: the controller manager and scheduler
        serve self-signed certificates on loopback, and only the body "ok" is read."""
        context = ssl._create_unverified_context() if url.startswith("https") else None
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            body: bytes = response.read()
            return body
