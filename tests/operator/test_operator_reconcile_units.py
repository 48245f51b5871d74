"""Pieces of the reconciler that need no API server: the apply/skip decision behind the
write-free resync, and the operator's import hygiene (no vLLM, no torch)."""

from __future__ import annotations

from typing import Any

from ucm_operator.constants import ANNOTATION_APPLIED_HASH
from ucm_operator.kube import resource_of
from ucm_operator.reconcile import Reconciler


def obj(digest: str | None, *, uid: str = "u1", generation: int | None = 1, rv: str = "10",
        kind: str = "Deployment") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "x", "uid": uid, "resourceVersion": rv,
                            "annotations": {ANNOTATION_APPLIED_HASH: digest} if digest else {}}
    if generation is not None:
        meta["generation"] = generation
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta}


def reconciler() -> Reconciler:
    return Reconciler(kube=None)  # type: ignore[arg-type]  # needs_apply never calls the API


def test_missing_or_changed_children_are_applied() -> None:
    r = reconciler()
    assert r.needs_apply(obj("h1"), None)
    assert r.needs_apply(obj("h2"), obj("h1"))
    assert r.needs_apply(obj("h1"), obj(None))  # created by someone else / older operator


def test_unchanged_children_are_skipped_even_after_a_restart() -> None:
    r = reconciler()  # a fresh process: no memory, trusts the annotation
    assert not r.needs_apply(obj("h1"), obj("h1", generation=7))
    assert not r.needs_apply(obj("h1"), obj("h1", generation=7))


def test_edits_by_others_are_detected_by_generation() -> None:
    r = reconciler()
    r._remember(obj("h1", generation=3), "h1")            # what our apply returned
    assert not r.needs_apply(obj("h1"), obj("h1", generation=3, rv="99"))  # status updates only
    assert r.needs_apply(obj("h1"), obj("h1", generation=4))                # `kubectl scale`, edits


def test_kinds_without_generation_use_resource_version() -> None:
    r = reconciler()
    r._remember(obj("h1", generation=None, rv="5", kind="Service"), "h1")
    assert not r.needs_apply(obj("h1"), obj("h1", generation=None, rv="5", kind="Service"))
    assert r.needs_apply(obj("h1"), obj("h1", generation=None, rv="6", kind="Service"))
    # Claims are rewritten by the binder and immutable anyway: never re-applied for that.
    r._remember(obj("h1", uid="c", generation=None, rv="5", kind="PersistentVolumeClaim"), "h1")
    assert not r.needs_apply(obj("h1"), obj("h1", uid="c", generation=None, rv="9", kind="PersistentVolumeClaim"))


def test_write_counter_names_resources() -> None:
    assert resource_of("/apis/apps/v1/namespaces/ns/deployments/x") == "deployments"
    assert resource_of("/apis/ucm.dev/v1alpha1/namespaces/ns/ucmclusters/x/status") == "ucmclusters/status"
    assert resource_of("/api/v1/namespaces/ns/events") == "events"
