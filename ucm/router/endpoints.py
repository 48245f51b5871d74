"""The router's view of its upstreams: endpoints, their health, and how a request picks a pair.

Pairing rule: a prefill endpoint and a decode endpoint serve one request together only if their
`ucm.dev/revision` is equal, so old and new pods never mix during a rollout (the KV a prefill
writes is only meaningful to a decode of the same model revision and cache layout).

Choosing a revision while several serve: among the *complete* revisions (at least one available
prefill and one available decode) pick the least loaded one (the sum of its least-outstanding
prefill and least-outstanding decode), ties going to the newest revision (the one whose oldest
pod was created last). Traffic therefore follows capacity as a rollout moves pods from the old
revision to the new one, and a fresh, idle new revision takes over when loads are equal.

Availability of an endpoint: discovered ready, not failing active health probes, and not
ejected. Passive ejection: `failures` consecutive failed requests eject an endpoint for
`base_s * 2**(n-1)` seconds (capped at `max_s`) on its n-th consecutive ejection; any success
resets both counters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from ucm.router.affinity import rendezvous_weight

Role = Literal["prefill", "decode"]
AffinityResult = Literal["hit", "overflow", "none"]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One upstream vLLM server as discovery reports it."""

    url: str  # base URL, e.g. "http://10.0.0.5:8000"
    role: Role
    revision: str
    pool: str = ""
    name: str = ""  # pod name (Kubernetes) or the URL (static)
    created: float = 0.0  # pod creation time, epoch seconds (orders revisions by age)


@dataclasses.dataclass(frozen=True)
class EjectionPolicy:
    failures: int = 3
    base_s: float = 1.0
    max_s: float = 30.0


@dataclasses.dataclass(eq=False)
class EndpointState:
    """Mutable per-endpoint counters; identity-compared, kept while the endpoint is discovered."""

    endpoint: Endpoint
    outstanding: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    probe_ok: bool = True
    requests: int = 0
    failures: int = 0

    def available(self, now: float) -> bool:
        return self.probe_ok and now >= self.ejected_until


@dataclasses.dataclass
class Route:
    """A revision-coherent choice for one request (the decode endpoint is picked after prefill)."""

    revision: str
    prefill: EndpointState
    affinity: AffinityResult


class Registry:
    """Endpoints by revision and role; all selection happens here (single event loop, no locks)."""

    def __init__(
        self,
        ejection: EjectionPolicy | None = None,
        *,
        affinity_slack: int = 4,
        clock: Any = time.monotonic,
    ) -> None:
        self.ejection = ejection or EjectionPolicy()
        self.affinity_slack = affinity_slack
        self._clock = clock
        self._states: dict[tuple[str, str, str], EndpointState] = {}
        # revision -> (prefill states, decode states); rebuilt on every discovery change
        self._by_revision: dict[str, tuple[list[EndpointState], list[EndpointState]]] = {}
        self._revision_created: dict[str, float] = {}
        self._rr: dict[tuple[str | None, str], int] = {}  # rotation counter per (revision, role)
        self.generation = 0  # bumps on every change (tests and the debug view use it)

    # ---- discovery side -------------------------------------------------------------------
    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the whole endpoint set; counters survive for endpoints that stay."""
        states: dict[tuple[str, str, str], EndpointState] = {}
        for ep in endpoints:
            key = (ep.role, ep.url, ep.revision)
            old = self._states.get(key)
            if old is not None:
                old.endpoint = ep  # same object: in-flight leases keep counting on it
            states[key] = old or EndpointState(ep)
        self._states = states
        by_rev: dict[str, tuple[list[EndpointState], list[EndpointState]]] = {}
        created: dict[str, float] = {}
        for state in sorted(states.values(), key=lambda s: s.endpoint.url):
            ep = state.endpoint
            pair = by_rev.setdefault(ep.revision, ([], []))
            (pair[0] if ep.role == "prefill" else pair[1]).append(state)
            created[ep.revision] = min(created.get(ep.revision, ep.created), ep.created)
        self._by_revision = by_rev
        self._revision_created = created
        self.generation += 1

    def states(self) -> list[EndpointState]:
        return list(self._states.values())

    # ---- selection ------------------------------------------------------------------------
    def _least_loaded(
        self, states: list[EndpointState], now: float, group: tuple[str | None, str]
    ) -> EndpointState | None:
        """Fewest outstanding requests; ties rotate so idle endpoints share sequential traffic."""
        n = len(states)
        if n == 0:
            return None
        turn = self._rr.get(group, 0)
        self._rr[group] = turn + 1
        start = turn % n
        best: EndpointState | None = None
        for i in range(n):
            state = states[(start + i) % n]
            if state.available(now) and (best is None or state.outstanding < best.outstanding):
                best = state
        return best

    def choose_route(self, prefix_key: bytes | None) -> Route | None:
        """Pick a complete revision and its prefill endpoint; None when no revision is complete."""
        now = self._clock()
        best: tuple[int, float, str] | None = None
        chosen: tuple[str, EndpointState] | None = None
        for revision, (prefills, decodes) in self._by_revision.items():
            prefill = self._least_loaded(prefills, now, (revision, "prefill"))
            if prefill is None:
                continue
            decode_load = min((d.outstanding for d in decodes if d.available(now)), default=None)
            if decode_load is None:
                continue
            score = (prefill.outstanding + decode_load, -self._revision_created[revision], revision)
            if best is None or score < best:
                best, chosen = score, (revision, prefill)
        if chosen is None:
            return None
        revision, least = chosen
        if prefix_key is None:
            return Route(revision, least, "none")
        candidates = [s for s in self._by_revision[revision][0] if s.available(now)]
        preferred = max(candidates, key=lambda s: rendezvous_weight(prefix_key, s.endpoint.url))
        if preferred.outstanding > least.outstanding + self.affinity_slack:
            return Route(revision, least, "overflow")
        return Route(revision, preferred, "hit")

    def choose_decode(
        self, revision: str | None, exclude: EndpointState | None = None
    ) -> EndpointState | None:
        """Least-loaded available decode endpoint of `revision` (any revision when None)."""
        now = self._clock()
        if revision is None:
            pool = [s for s in self._states.values() if s.endpoint.role == "decode"]
        else:
            pool = self._by_revision.get(revision, ([], []))[1]
        if exclude is not None:
            pool = [s for s in pool if s is not exclude]
        return self._least_loaded(pool, now, (revision, "decode"))

    def complete_revisions(self) -> list[str]:
        now = self._clock()
        return sorted(
            rev
            for rev, (prefills, decodes) in self._by_revision.items()
            if any(s.available(now) for s in prefills) and any(s.available(now) for s in decodes)
        )

    def has_decode(self) -> bool:
        now = self._clock()
        return any(s.endpoint.role == "decode" and s.available(now) for s in self._states.values())

    # ---- outcome bookkeeping --------------------------------------------------------------
    @contextmanager
    def lease(self, state: EndpointState) -> Iterator[EndpointState]:
        """Counts a request as outstanding on `state` for the duration of the block."""
        state.outstanding += 1
        state.requests += 1
        try:
            yield state
        finally:
            state.outstanding -= 1

    def record_success(self, state: EndpointState) -> None:
        state.consecutive_failures = 0
        state.ejections = 0

    def record_failure(self, state: EndpointState) -> bool:
        """Counts a failed request; returns True when this failure ejected the endpoint."""
        state.failures += 1
        state.consecutive_failures += 1
        if state.consecutive_failures < self.ejection.failures:
            return False
        state.ejections += 1
        backoff = min(self.ejection.max_s, self.ejection.base_s * 2 ** (state.ejections - 1))
        state.ejected_until = self._clock() + backoff
        state.consecutive_failures = 0
        return True

    def snapshot(self) -> dict[str, Any]:
        """The debug view (`GET /debug/endpoints`): every endpoint with its state, by revision."""
        now = self._clock()
        revisions: dict[str, Any] = {}
        for revision, (prefills, decodes) in sorted(self._by_revision.items()):
            revisions[revision] = {
                "created": self._revision_created[revision],
                "prefill": [_describe(s, now) for s in prefills],
                "decode": [_describe(s, now) for s in decodes],
            }
        return {
            "generation": self.generation,
            "complete_revisions": self.complete_revisions(),
            "revisions": revisions,
        }


def _describe(state: EndpointState, now: float) -> dict[str, Any]:
    ep = state.endpoint
    return {
        "url": ep.url,
        "name": ep.name,
        "pool": ep.pool,
        "available": state.available(now),
        "probe_ok": state.probe_ok,
        "ejected_for_s": round(max(0.0, state.ejected_until - now), 3),
        "outstanding": state.outstanding,
        "requests": state.requests,
        "failures": state.failures,
    }
