"""The operator's Kubernetes client: the handful of verbs it uses, on plain dicts.

kopf watches; this applies. kopf patches with merge/JSON patches only, so children are written
here with server-side apply under one field manager, through kubernetes_asyncio's authenticated
transport (kubeconfig or in-cluster service account). Every write is counted, so the operator can
prove it makes none when nothing changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from tierwise.naming import FIELD_MANAGER

Obj = dict[str, Any]
Objs = list[Obj]  # spelled here: inside Kube, `list` is the method
USER_AGENT = "tierwise-operator"
TRANSIENT = frozenset({0, 408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def group_path(self) -> str:
        return f"/apis/{self.api_version}" if "/" in self.api_version else f"/api/{self.api_version}"

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = self.group_path
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if sub is not None:
            base += f"/{sub}"
        return base


DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
SERVICE = Kind("v1", "Service", "services")
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
HPA = Kind("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
SCALED_OBJECT = Kind("keda.sh/v1alpha1", "ScaledObject", "scaledobjects")
CONFIGMAP = Kind("v1", "ConfigMap", "configmaps")
NAMESPACE = Kind("v1", "Namespace", "namespaces", namespaced=False)
TIER = Kind("tierwise.dev/v1alpha1", "InferenceTier", "inferencetiers")
BUDGET = Kind("tierwise.dev/v1alpha1", "CostBudget", "costbudgets")
CACHE = Kind("tierwise.dev/v1alpha1", "CachePolicy", "cachepolicies")
EVENT = Kind("v1", "Event", "events")
SECRET = Kind("v1", "Secret", "secrets")
MUTATING_WEBHOOKS = Kind(
    "admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations", False
)
VALIDATING_WEBHOOKS = Kind(
    "admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", "validatingwebhookconfigurations", False
)
KINDS = {k.kind: k for k in (DEPLOYMENT, SERVICE, PDB, HPA, SCALED_OBJECT, CONFIGMAP, NAMESPACE, TIER, BUDGET, CACHE)}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        """Worth retrying with backoff; anything else is the request's fault and will fail again."""
        return self.status in TRANSIENT


def kind_of(obj: Obj) -> Kind:
    return KINDS[str(obj["kind"])]


Counter = Callable[[str, Kind], None]


class Kube:
    def __init__(self, api: k8s.ApiClient, on_write: Counter | None = None) -> None:
        self.api = api
        self._on_write = on_write or (lambda verb, kind: None)

    @classmethod
    async def connect(
        cls, kubeconfig: str | None = None, on_write: Counter | None = None, user_agent: str = USER_AGENT
    ) -> Kube:
        """From a kubeconfig (argument, $KUBECONFIG, ~/.kube/config) or, inside a pod, its service account."""
        cfg = k8s.Configuration()
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ and "KUBECONFIG" not in os.environ:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        api = k8s.ApiClient(configuration=cfg)
        api.user_agent = user_agent
        return cls(api, on_write)

    async def close(self) -> None:
        await self.api.close()

    async def _call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None = None,
        body: Obj | Sequence[Obj] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        try:
            resp = await self.api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=30,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(0, "Unreachable", f"{method} {path}: {type(e).__name__}: {e}") from e
        try:
            raw = await resp.read()
        finally:
            resp.release()
        try:
            data: Obj = json.loads(raw) if raw else {}
        except ValueError:
            data = {"message": raw[:200].decode(errors="replace")}
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, str(data.get("reason", "")), str(data.get("message", "")))
        return data

    async def get(self, kind: Kind, namespace: str | None, name: str) -> Obj | None:
        try:
            return await self._call("GET", kind.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, kind: Kind, namespace: str | None = None, label_selector: str | None = None) -> list[Obj]:
        items, _ = await self.list_versioned(kind, namespace, label_selector)
        return items

    async def list_versioned(
        self, kind: Kind, namespace: str | None = None, label_selector: str | None = None
    ) -> tuple[Objs, str]:
        """Every object, and the collection's resourceVersion to watch from."""
        base = [("labelSelector", label_selector)] if label_selector else []
        query = base
        items: list[Obj] = []
        while True:
            page = await self._call("GET", kind.path(namespace), [*query, ("limit", "500")])
            for item in page.get("items", []):
                item.setdefault("apiVersion", kind.api_version)
                item.setdefault("kind", kind.kind)
                items.append(item)
            meta = page.get("metadata", {})
            cont = meta.get("continue")
            if not cont:
                return items, str(meta.get("resourceVersion") or "")
            query = [*base, ("continue", cont)]

    async def watch(
        self, kind: Kind, resource_version: str, timeout: int = 240, silence: float = 120.0
    ) -> AsyncGenerator[Obj, None]:
        """Watch events ({"type", "object"}) of every object of `kind` after `resource_version`,
        bookmarks included, until the server ends the watch (after about `timeout` seconds).

        A watch that stays silent for `silence` seconds ends too: the API server sends a bookmark
        about every minute, so silence means a connection that died without closing.
        """
        query = [
            ("watch", "1"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout)),
        ]
        try:
            resp = await self.api.call_api(
                kind.path(None), "GET", query_params=query, header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"], _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=timeout + 30, sock_connect=10, sock_read=silence),
            )  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiError(0, "Unreachable", f"watch {kind.plural}: {type(e).__name__}: {e}") from e
        try:
            if resp.status != 200:
                raw = await resp.read()
                raise ApiError(resp.status, "", raw[:200].decode(errors="replace"))
            # Split lines by hand: an object may be longer than aiohttp's line limit.
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        except TimeoutError:
            return  # silent too long: the caller watches again from the last version it saw
        except (aiohttp.ClientError, OSError) as e:
            raise ApiError(0, "Unreachable", f"watch {kind.plural}: {type(e).__name__}: {e}") from e
        finally:
            resp.release()

    async def _patch_object(self, obj: Obj, verb: str, content_type: str, force: bool) -> Obj:
        kind = kind_of(obj)
        meta = obj["metadata"]
        query = [("fieldManager", FIELD_MANAGER), *([("force", "true")] if force else [])]
        self._on_write(verb, kind)
        return await self._call("PATCH", kind.path(meta.get("namespace"), meta["name"]), query, obj, content_type)

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply under the operator's field manager; conflicts are forced (we own these fields)."""
        return await self._patch_object(obj, "apply", "application/apply-patch+yaml", force=True)

    async def replace_fields(self, obj: Obj) -> Obj:
        """JSON merge patch of the whole declared object: lists are replaced wholesale, so entries
        another manager added to a list we own (a port, a container) are dropped."""
        return await self._patch_object(obj, "patch", "application/merge-patch+json", force=False)

    async def create(self, kind: Kind, obj: Obj) -> Obj:
        self._on_write("create", kind)
        return await self._call("POST", kind.path(obj["metadata"].get("namespace")), body=obj)

    async def update(self, kind: Kind, obj: Obj) -> Obj:
        """PUT the whole object; with metadata.resourceVersion set, a concurrent writer gets a 409."""
        meta = obj["metadata"]
        self._on_write("update", kind)
        return await self._call("PUT", kind.path(meta.get("namespace"), meta["name"]), body=obj)

    async def json_patch(self, kind: Kind, namespace: str | None, name: str, ops: Sequence[Obj]) -> Obj:
        self._on_write("patch", kind)
        return await self._call(
            "PATCH", kind.path(namespace, name), body=ops, content_type="application/json-patch+json"
        )

    async def delete(self, kind: Kind, namespace: str | None, name: str) -> bool:
        self._on_write("delete", kind)
        try:
            await self._call("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"})
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def patch_status(self, kind: Kind, namespace: str, name: str, status: Obj) -> Obj:
        """Merge-patch the status subresource (status is the operator's alone; spec is never touched)."""
        self._on_write("status", kind)
        return await self._call(
            "PATCH", kind.path(namespace, name, "status"), [("fieldManager", FIELD_MANAGER)], {"status": status},
            "application/merge-patch+json",
        )  # fmt: skip

    async def event(self, obj: Obj, type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about `obj` (creations, scale changes, errors)."""
        meta = obj["metadata"]
        ns = meta.get("namespace") or "default"
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": ns,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "action": reason,
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": os.environ.get("HOSTNAME", FIELD_MANAGER),
            "count": 1,
        }
        self._on_write("create", EVENT)
        await self._call("POST", EVENT.path(ns), body=event)

    async def serves(self, kind: Kind) -> bool:
        """Does the API server know this kind (e.g. is KEDA installed)?"""
        try:
            found = await self._call("GET", kind.group_path)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return any(r.get("name") == kind.plural for r in found.get("resources", []))
