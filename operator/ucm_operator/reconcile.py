"""One reconciliation of one UCMCluster: read, validate, build, apply what changed, prune what is
no longer wanted, write the status if it changed. Idempotent and stateless across restarts (the
in-memory drift record only ever adds writes, never skips needed ones), so the operator killed at
any point converges when it starts again.

Zero writes on a no-op resync is by construction:
- a child is applied only when its desired manifest hash differs from the hash annotation on the
  live object, or when the live object changed since this process last applied it (its
  generation — or resourceVersion for kinds without one — moved: someone edited it);
- the status is patched only when the newly computed object differs from the live one, and
  conditions keep their lastTransitionTime while unchanged;
- Warning events are posted only when a problem first appears or changes.

Nothing is written for a spec the API server would refuse: the children a pass would apply are
first dry-run (admission.py), and any refusal becomes Valid=False on the UCMCluster field behind
it. Only children that would be applied are dry-run, so a no-op resync makes no dry run either.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .admission import Admission
from .autoscale import Recommendation, decide, parse_router_inflight, policy_of, policy_problems
from .build import build_children
from .compat import LiveStore, Problem, check_cluster
from .constants import (
    ANNOTATION_APPLIED_HASH,
    API_VERSION,
    KIND,
    LABEL_CLUSTER,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    POOL_KIND,
    STORE_SCRAPE_SECONDS,
)
from .facts import NodeFacts, node_problems
from .kube import CHILD_KINDS, Kube, KubeError, object_path
from .meta import claim_name, pool_name, revision
from .scale import (
    AUTOSCALER_MANAGER,
    REBASE_MANAGER,
    PoolReplicas,
    build_rebase,
    plan_replicas,
    pool_status,
    scaler_version,
    scalers_by_pool,
    with_replicas,
)
from .signals import fetch_each, fetch_texts, router_metric_urls, worker_metric_urls
from .spec import ClusterSpec, SpecError, parse_cluster
from .status import CONDITION_TYPES, Observed, compute_status, now, ready_by_revision
from .store_usage import PodSample, Window, compute_store_usage, parse_pod

JSON = dict[str, Any]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StoreReading:
    """One scrape of a cluster's workers: what status.store and StoreHealthy show until the next."""

    at: float
    sources: tuple[str, ...]  # the worker endpoints read: a pod turning Ready is read at once
    usage: dict[str, Any]
    condition: dict[str, str]
    window: Window


@dataclasses.dataclass
class Outcome:
    """What one pass did: objects written (applied or pruned), whether the status was patched,
    and errors (the runtime retries with backoff when there are any). `namespace_terminating`:
    the pass stopped because the namespace is being deleted (no error: nothing to retry)."""

    found: bool = True
    namespace_terminating: bool = False
    applied: int = 0
    pruned: int = 0
    status_written: bool = False
    pool_statuses: int = 0
    scaled: int = 0          # /scale writes of the autoscaler (spec.autoscaling)
    events: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None   # autoscaled clusters are re-evaluated on a timer

    @property
    def writes(self) -> int:
        return self.applied + self.pruned + int(self.status_written) + self.pool_statuses + self.scaled + self.events


def _key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def _version(obj: Mapping[str, Any]) -> str:
    """What changes when someone edits the object's desired state: the generation where the kind
    has one (status updates by controllers do not move it), else the resourceVersion."""
    if obj.get("kind") == POOL_KIND:
        return scaler_version(obj)  # a /scale write is no edit of what the operator applied
    meta = obj.get("metadata") or {}
    generation = meta.get("generation")
    return f"g{generation}" if generation else f"rv{meta.get('resourceVersion', '')}"


def _hash(obj: Mapping[str, Any]) -> str | None:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(ANNOTATION_APPLIED_HASH)
    return str(value) if value is not None else None


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _status_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    """Which status fields (and conditions) changed, for the debug log."""
    changed = [k for k in after if k != "conditions" and before.get(k) != after.get(k)]
    old = {c.get("type"): c for c in before.get("conditions") or []}
    changed += [f"{c['type']}: {old.get(c['type'], {}).get('status')}->{c['status']} {c['message']}"
                for c in after.get("conditions") or [] if old.get(c["type"]) != c]
    return "; ".join(changed)


class Reconciler:
    """Reconciles UCMClusters through a `Kube`. Thread-safe across different clusters; the runtime
    guarantees one pass at a time per cluster."""

    def __init__(self, kube: Kube, router_metrics_url: str | None = None, worker_metrics_urls: Sequence[str] = (),
                 store_scrape_seconds: float = STORE_SCRAPE_SECONDS) -> None:
        self.kube = kube
        self.router_metrics_url = router_metrics_url
        self.worker_metrics_urls = tuple(worker_metrics_urls)
        self.store_scrape_seconds = store_scrape_seconds
        # cluster -> (when its workers' /metrics were last read, status.store, StoreHealthy, window)
        self._store: dict[tuple[str, str], StoreReading] = {}
        # cluster -> the autoscaler's recent recommendations (its stabilisation windows)
        self._history: dict[tuple[str, str], tuple[Recommendation, ...]] = {}
        # uid of a child -> (hash we applied, its version right after): detects edits by others.
        self._applied: dict[str, tuple[str, str]] = {}
        # cluster -> uids of its children in _applied, so records of deleted children are dropped.
        self._children: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()
        self.admission = Admission(kube)
        self._nodes_unreadable = False
        self.passes = 0

    # --- drift memory ------------------------------------------------------------------------

    def _remember(self, obj: Mapping[str, Any], digest: str) -> None:
        uid = (obj.get("metadata") or {}).get("uid")
        if uid:
            with self._lock:
                self._applied[uid] = (digest, _version(obj))

    def needs_apply(self, desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
        if live is None:
            return True
        digest = _hash(desired)
        if _hash(live) != digest:
            return True
        uid = live["metadata"].get("uid", "")
        with self._lock:
            record = self._applied.get(uid)
            if record is None or record[0] != digest:
                # First sight since start (or re-applied by an earlier process): trust the
                # annotation and take the current version as the baseline for later edits.
                self._applied[uid] = (str(digest), _version(live))
                return False
        # PVCs: the binder rewrites them (status, annotations) and their spec is immutable.
        return record[1] != _version(live) and live["kind"] != "PersistentVolumeClaim"

    # --- one pass ----------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> Outcome:
        self.passes += 1
        body = self.kube.get(API_VERSION, KIND, namespace, name)
        if body is None:
            self._forget(namespace, name, set())
            return Outcome(found=False)
        if body["metadata"].get("deletionTimestamp"):
            return Outcome()  # children go by garbage collection
        try:
            spec = parse_cluster(body)
        except SpecError as exc:
            return self._unparseable(body, exc)
        selector = f"{LABEL_CLUSTER}={name},{LABEL_MANAGED_BY}={MANAGED_BY}"
        live: dict[tuple[str, str, str], JSON] = {}
        pools_served = True
        for api_version, kind in CHILD_KINDS:
            try:
                found = self.kube.list(api_version, kind, namespace, selector)
            except KubeError as exc:
                if kind != POOL_KIND or exc.status != 404:
                    raise
                pools_served = False   # the chart was upgraded without `kubectl apply -f crds/`
                continue
            for obj in found:
                live[_key(obj)] = obj
        pods = self.kube.list("v1", "Pod", namespace, selector)
        claim = self._claim(spec.store.kind, namespace, claim_name(spec), live)
        live_store = LiveStore()
        if claim is not None:
            live_store = LiveStore(tuple(claim["spec"].get("accessModes") or ()),
                                   claim["spec"].get("storageClassName"),
                                   ((claim.get("status") or {}).get("capacity") or {}).get("storage")
                                   or claim["spec"].get("resources", {}).get("requests", {}).get("storage"))
        problems = check_cluster(spec, live_store) + node_problems(spec, self._nodes()) + policy_problems(spec)
        outcome = Outcome()
        sized = spec
        autoscaling: JSON | None = None
        if not problems:
            # Pool sizes come from the UCMPools (/scale), re-based where the UCMCluster's changed.
            scalers = scalers_by_pool(live)
            plan = plan_replicas(spec, scalers)
            if spec.autoscaling is not None and pools_served:
                outcome.requeue_after = float(spec.autoscaling.interval_seconds)
                autoscaling = self._autoscale(spec, plan, scalers, pods, outcome)
            sized = with_replicas(spec, plan)
            desired = build_children(sized)
            if not pools_served:
                desired = [c for c in desired if c["kind"] != POOL_KIND]
            pending = self._pending(desired, live)
            problems = self._admit(spec, pending, live, outcome)
            if not problems and not outcome.errors and not outcome.namespace_terminating:
                self._apply(spec.uid, desired, pending, live, outcome)
                if pools_served:
                    self._rebase(spec, [p.pool for p in plan.values() if p.rebase], live, outcome)
                    self._pool_statuses(sized, live, outcome)
                else:
                    # Everything else is applied (pools sized by the UCMCluster, as before UCMPools);
                    # Degraded says what to do, and the pass is retried until the CRD is there.
                    outcome.errors.append(f"the {POOL_KIND} CRD (ucmpools.ucm.dev) is not installed, so pools "
                                          "cannot be scaled through /scale: kubectl apply -f crds/")
        if outcome.namespace_terminating:
            # The namespace controller deletes this cluster next; a status or a Warning event
            # for a 403 that is no fault of the spec or of RBAC would only mislead.
            log.info("%s/%s: namespace %s is being deleted; nothing more to apply", namespace, name, namespace)
            return outcome
        store = self._store_usage(spec, pods, outcome)
        observed = Observed(spec=sized, generation=spec.generation, revision=revision(spec), problems=problems,
                            deployments=[o for k, o in live.items() if k[1] == "Deployment"], pods=pods,
                            claim=claim, applied=outcome.applied + outcome.pruned, errors=outcome.errors,
                            autoscaling=autoscaling, store_usage=store.usage if store else None,
                            store_health=store.condition if store else None)
        status = compute_status(observed, body.get("status"))
        self._report(body, status, outcome)
        self._forget(namespace, name, {o["metadata"].get("uid", "") for o in live.values()})
        return outcome

    def _forget(self, namespace: str, name: str, live_uids: set[str]) -> None:
        """Keep drift records only for children that still exist (bounded memory)."""
        with self._lock:
            if not live_uids:
                self._history.pop((namespace, name), None)
                self._store.pop((namespace, name), None)
            gone = self._children.get((namespace, name), set()) - live_uids
            for uid in gone:
                self._applied.pop(uid, None)
            if live_uids:
                self._children[(namespace, name)] = live_uids
            else:
                self._children.pop((namespace, name), None)

    def _nodes(self) -> list[NodeFacts] | None:
        """The nodes' GPU facts; None when they cannot be read (then the GPU check is skipped:
        an operator installed with an older chart may lack the read on nodes)."""
        try:
            return [NodeFacts.of(node) for node in self.kube.list("v1", "Node", None)]
        except KubeError as exc:
            if not self._nodes_unreadable:
                log.warning("cannot read nodes (%s); the GPUs-per-node check is skipped", exc)
                self._nodes_unreadable = True
            return None

    def _claim(self, store_kind: str, namespace: str, name: str,
               live: Mapping[tuple[str, str, str], JSON]) -> JSON | None:
        if store_kind == "pvc":
            found = live.get(("v1", "PersistentVolumeClaim", name))
            # A retained claim from an earlier cluster of this name carries our labels too.
            return found if found is not None else self.kube.get("v1", "PersistentVolumeClaim", namespace, name)
        if store_kind == "existingClaim":
            return self.kube.get("v1", "PersistentVolumeClaim", namespace, name)
        return None

    def _pending(self, desired: Sequence[JSON], live: Mapping[tuple[str, str, str], JSON]) -> list[JSON]:
        """The desired children this pass must apply (new, changed, or edited by someone else)."""
        pending = []
        for manifest in desired:
            current = live.get(_key(manifest))
            if current is not None and current["metadata"].get("deletionTimestamp"):
                continue  # being deleted; its deletion event brings us back to re-create it
            if self.needs_apply(manifest, current):
                pending.append(manifest)
        return pending

    def _admit(self, spec: ClusterSpec, pending: Sequence[JSON], live: Mapping[tuple[str, str, str], JSON],
               outcome: Outcome) -> list[Problem]:
        """Dry-run every pending child; the API server's refusals as problems on the spec."""
        checks = []
        for manifest in pending:
            current = live.get(_key(manifest))
            checks.append((manifest, current, _version(current) if current is not None else "new"))
        try:
            return self.admission.check(spec, checks)
        except KubeError as exc:
            if exc.namespace_terminating:
                outcome.namespace_terminating = True
            else:
                outcome.errors.append(f"dry run: {exc.message}")
            return []

    def _apply(self, uid: str, desired: Sequence[JSON], pending: Sequence[JSON],
               live: dict[tuple[str, str, str], JSON], outcome: Outcome) -> None:
        wanted = {_key(manifest) for manifest in desired}
        for manifest in pending:
            key = _key(manifest)
            try:
                result = self.kube.apply(manifest)
            except KubeError as exc:
                if exc.namespace_terminating:
                    outcome.namespace_terminating = True
                    return
                outcome.errors.append(f"{manifest['kind']} {manifest['metadata']['name']}: {exc.message}")
                continue
            self._remember(result, str(_hash(manifest)))
            live[key] = result
            outcome.applied += 1
        if outcome.errors:
            return  # never remove what runs while its replacement failed to apply
        for key, obj in list(live.items()):
            if key in wanted or not _owned_by(obj, uid) or obj["metadata"].get("deletionTimestamp"):
                continue
            try:
                self.kube.delete(obj)
            except KubeError as exc:
                outcome.errors.append(f"delete {key[1]} {key[2]}: {exc.message}")
                continue
            del live[key]
            outcome.pruned += 1

    def _autoscale(self, spec: ClusterSpec, plan: dict[str, PoolReplicas], scalers: Mapping[str, JSON],
                   pods: Sequence[JSON], outcome: Outcome) -> JSON:
        """spec.autoscaling: read the routers' in-flight requests, decide (autoscale.decide, pure)
        and write each changed size through the UCMPool's /scale, as an HPA would; `plan` gets
        the new sizes so this pass's Deployments have them. A re-base (the UCMCluster's replicas
        edited) wins this pass; the autoscaler moves on from it at the next interval. What
        it saw and did, for status.autoscaling."""
        key = (spec.namespace, spec.name)
        if any(p.rebase for p in plan.values()):
            return {"message": "waiting: a pool is being re-based to the UCMCluster's replicas"}
        policy = policy_of(spec)
        assert policy is not None
        urls = router_metric_urls(spec.namespace, spec.name, pods, self.router_metrics_url)
        if not urls:
            return {"message": "no Ready router pod to read in-flight requests from; sizes unchanged"}
        try:
            inflight = parse_router_inflight(fetch_texts(urls))
        except (OSError, ValueError) as exc:
            return {"message": f"router metrics unavailable, sizes unchanged: {exc}"}
        current = {name: p.replicas for name, p in plan.items()}
        decision = decide(policy, inflight, current, ready_by_revision(pods), self._history.get(key, ()),
                          time.monotonic())
        self._history[key] = decision.history
        for name, replicas in decision.replicas.items():
            if replicas == current[name]:
                continue
            try:
                self.kube.request("PATCH", object_path(scalers[name]) + "/scale",
                                  query=[("fieldManager", AUTOSCALER_MANAGER)],
                                  body={"spec": {"replicas": replicas}}, content_type="application/merge-patch+json")
            except KubeError as exc:
                outcome.errors.append(f"scale {name}: {exc.message}")
                continue
            log.info("%s/%s: autoscaled pool %s %d -> %d (%s)", spec.namespace, spec.name, name, current[name],
                     replicas, decision.reason)
            plan[name] = PoolReplicas(name, replicas, rebase=False)
            outcome.scaled += 1
        return {"inflight": inflight, "prefill": decision.prefill, "decode": decision.decode,
                "message": decision.reason}

    def _store_usage(self, spec: ClusterSpec, pods: Sequence[JSON], outcome: Outcome) -> StoreReading | None:
        """status.store and StoreHealthy from the worker pods' /metrics (store_usage.py), read at
        most every store_scrape_seconds; in between, a pass shows the last reading. None when
        scraping is off. Asks for the next pass when the next reading is due."""
        if self.store_scrape_seconds <= 0:
            return None
        key = (spec.namespace, spec.name)
        t = time.monotonic()
        previous = self._store.get(key)
        urls = worker_metric_urls(spec.namespace, spec.name, pods, self.worker_metrics_urls)
        if previous is None or t - previous.at >= self.store_scrape_seconds or previous.sources != tuple(urls):
            bodies, errors = fetch_each(urls)
            samples: dict[str, PodSample | None] = {}
            for source, body in bodies.items():
                try:
                    samples[source] = parse_pod(source, body)
                except ValueError as exc:
                    errors[source] = str(exc)
            usage, condition, window = compute_store_usage(samples, errors, previous.window if previous else Window(),
                                                           expected_pods=len(urls))
            reading = StoreReading(t, tuple(urls), usage, condition, window)
            with self._lock:
                self._store[key] = reading
        else:
            assert previous is not None
            reading = previous
        wait = max(0.1, reading.at + self.store_scrape_seconds - t)
        outcome.requeue_after = wait if outcome.requeue_after is None else min(outcome.requeue_after, wait)
        return reading

    def _rebase(self, spec: ClusterSpec, pools: Sequence[str], live: dict[tuple[str, str, str], JSON],
                outcome: Outcome) -> None:
        """Set each listed pool's UCMPool to the UCMCluster's replicas (scale.py: a new pool, or
        an edit of the UCMCluster's value). After the main applies, so the UCMPool exists."""
        if outcome.errors or outcome.namespace_terminating:
            return
        by_name = {p.name: p for p in spec.pools}
        for name in pools:
            manifest = build_rebase(spec, by_name[name])
            try:
                result = self.kube.apply(manifest, manager=REBASE_MANAGER)
            except KubeError as exc:
                if exc.namespace_terminating:
                    outcome.namespace_terminating = True
                    return
                outcome.errors.append(f"{POOL_KIND} {manifest['metadata']['name']} replicas: {exc.message}")
                continue
            live[(manifest["apiVersion"], POOL_KIND, manifest["metadata"]["name"])] = result
            outcome.applied += 1

    def _pool_statuses(self, spec: ClusterSpec, live: Mapping[tuple[str, str, str], JSON], outcome: Outcome) -> None:
        """Each UCMPool's status from its Deployment, patched only when it changed."""
        if outcome.errors or outcome.namespace_terminating:
            return
        scalers = scalers_by_pool(live)
        for pool in spec.pools:
            scaler = scalers.get(pool.name)
            if scaler is None:
                continue
            deployment = live.get(("apps/v1", "Deployment", pool_name(spec, pool.name)))
            status = pool_status(spec, pool, scaler, deployment)
            if status == (scaler.get("status") or {}):
                continue
            try:
                self.kube.patch_status(scaler, status)
                outcome.pool_statuses += 1
            except KubeError as exc:
                if exc.namespace_terminating:
                    outcome.namespace_terminating = True
                    return
                if exc.status != 404:
                    outcome.errors.append(f"{POOL_KIND} {pool_name(spec, pool.name)} status: {exc.message}")

    def _report(self, body: JSON, status: JSON, outcome: Outcome) -> None:
        previous = body.get("status") or {}
        before = {c.get("type"): c for c in previous.get("conditions") or []}
        after = {c["type"]: c for c in status["conditions"]}
        # Events only when a problem appears or changes: a resync repeats nothing.
        for ctype, bad, reason in (("Valid", "False", "InvalidSpec"), ("Degraded", "True", "ApplyFailed")):
            cond = after.get(ctype)
            if cond is None or cond["status"] != bad or (ctype == "Degraded" and cond["reason"] != "ApplyFailed"):
                continue
            old = before.get(ctype) or {}
            if old.get("status") == cond["status"] and old.get("message") == cond["message"]:
                continue
            meta = body["metadata"]
            log.warning("%s/%s: %s: %s", meta["namespace"], meta["name"], reason, cond["message"])
            try:
                self.kube.event(body, type_="Warning", reason=reason, message=cond["message"], when=now())
                outcome.events += 1
            except KubeError as exc:
                log.log(logging.DEBUG if exc.namespace_terminating else logging.WARNING,
                        "could not post event for %s: %s", body["metadata"]["name"], exc)
        if status != previous:
            log.debug("%s/%s status changes: %s", body["metadata"]["namespace"], body["metadata"]["name"],
                      _status_diff(previous, status))
            try:
                self.kube.patch_status(body, status)
                outcome.status_written = True
            except KubeError as exc:
                if exc.status != 404:
                    outcome.errors.append(f"status: {exc.message}")

    def _unparseable(self, body: JSON, exc: SpecError) -> Outcome:
        """A spec the API server accepted but that cannot be read (a schema older than this
        operator): Valid=False naming the field; nothing else is touched."""
        previous = body.get("status") or {}
        status = dict(previous)
        old = {c.get("type"): c for c in previous.get("conditions") or []}
        generation = int(body["metadata"].get("generation") or 0)
        valid = {"type": "Valid", "status": "False", "reason": "InvalidSpec", "message": str(exc),
                 "observedGeneration": generation}
        prior = old.get("Valid") or {}
        valid["lastTransitionTime"] = (prior["lastTransitionTime"] if prior.get("status") == "False"
                                       and prior.get("lastTransitionTime") else now())
        conditions = [valid if c.get("type") == "Valid" else c for c in previous.get("conditions") or []]
        if "Valid" not in old:
            conditions.insert(0, valid)
        status.update(observedGeneration=generation,
                      conditions=sorted(conditions, key=lambda c: CONDITION_TYPES.index(c["type"])
                                        if c.get("type") in CONDITION_TYPES else 99))
        outcome = Outcome()
        self._report(body, status, outcome)
        return outcome
