"""The one module that talks to the Kubernetes API (Kopf's own traffic aside).

Server-side apply with one field manager for children we own, create-ignore-409 for pods
(pods are immutable: a new attempt is new pods), delete-ignore-404, merge-patches of status.
Results are plain dicts in the API's camelCase shape, parsed straight from the response's
JSON, so builders and tests compare them with what they rendered. Writes whose answer
nobody reads are sent with ``_preload_content=False`` and their body is not parsed: the
client would otherwise turn every answer into its typed models (a V1Pod for each created
Pod), which cost more CPU per job than ``decide`` and the builders together.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from graft.errors import api_error

FIELD_MANAGER = "graft-operator"
USER_AGENT = "graft-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
RAW: dict[str, Any] = {"_preload_content": False}

log = logging.getLogger(__name__)

# The first "resourceVersion" key of an object's JSON is metadata's (spec and status have
# none; a quote inside a string value is escaped, so no value can match).
_RESOURCE_VERSION = re.compile(rb'"resourceVersion":"([^"]*)"')

# apiVersion/kind -> plural, for the custom resources we read or write.
_CUSTOM = {
    ("graft.dev/v1alpha1", "FineTuneJob"): "finetunejobs",
    ("graft.dev/v1alpha1", "ModelService"): "modelservices",
    ("ray.io/v1", "RayService"): "rayservices",
}


def omit_empty_strings(obj: Any, in_list: bool = False) -> Any:
    """Drop "" values from objects inside lists.

    The Kubernetes 1.20 apiserver the tests run on turns an empty string inside a list
    item of a merge patch into null and then refuses it ("must be of type string"); an
    absent optional field means the same as an empty one to every reader.
    """
    if isinstance(obj, dict):
        return {
            k: omit_empty_strings(v, False) for k, v in obj.items() if not (in_list and v == "")
        }
    if isinstance(obj, list):
        return [omit_empty_strings(v, True) for v in obj]
    return obj


def proxy_from_environment(server: str) -> str | None:
    """The proxy for ``server`` from HTTPS_PROXY/HTTP_PROXY/NO_PROXY, read once.

    kubernetes_asyncio opens its session with ``trust_env=True``: aiohttp then reads the
    proxy variables and ~/.netrc again on every request (about 3 ms per job at scale).
    The environment of a running operator does not change, so it is read here once.
    """
    url = urlsplit(server)
    host = url.hostname or ""
    if not host or urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(url.scheme or "https")


async def _read(call: Awaitable[Any]) -> bytes:
    """The body of a request sent with ``_preload_content=False``; ApiException unless 2xx
    (the client checks the status only when it preloads)."""
    resp = await call
    data: bytes = await resp.read()
    if not 200 <= resp.status <= 299:
        e = ApiException(status=resp.status, reason=resp.reason)
        e.body = data
        e.headers = resp.headers
        raise e
    return data


async def _json(call: Awaitable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(await _read(call))
    return out


class Kube:
    """Thin async wrapper over kubernetes_asyncio with the operator's conventions."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.networking = client.NetworkingV1Api(api)

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig."""
        cfg = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            await config.load_kube_config(client_configuration=cfg)
        cfg.connection_pool_maxsize = 64
        if not cfg.proxy:
            cfg.proxy = proxy_from_environment(cfg.host or "")
        api = client.ApiClient(configuration=cfg)
        api.user_agent = USER_AGENT
        rest = api.rest_client
        connector = rest.pool_manager.connector
        rest.pool_manager.detach()
        rest.pool_manager = aiohttp.ClientSession(
            connector=connector, trust_env=False, read_bufsize=2**21
        )
        if cfg.proxy:
            rest.proxy = cfg.proxy
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    # -- generic -----------------------------------------------------------------------
    async def apply(self, obj: dict[str, Any]) -> None:
        """Server-side apply ``obj`` (ConfigMap, Service or a custom resource)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        kw: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "force": True,
            "_content_type": APPLY,
            **RAW,
        }
        calls = {
            "ConfigMap": self.core.patch_namespaced_config_map,
            "Service": self.core.patch_namespaced_service,
            "ServiceAccount": self.core.patch_namespaced_service_account,
            "Role": self.rbac.patch_namespaced_role,
            "RoleBinding": self.rbac.patch_namespaced_role_binding,
            "Lease": self.coordination.patch_namespaced_lease,
            "NetworkPolicy": self.networking.patch_namespaced_network_policy,
        }
        try:
            if kind in calls:
                await _read(calls[kind](name, ns, obj, **kw))
                return
            group, version = obj["apiVersion"].split("/")
            plural = _CUSTOM[(obj["apiVersion"], kind)]
            await _read(
                self.custom.patch_namespaced_custom_object(
                    group, version, ns, plural, name, obj, **kw
                )
            )
        except ApiException as e:
            raise api_error(e, f"apply {kind} {ns}/{name}") from e

    async def delete(self, kind: str, ns: str, name: str) -> None:
        """Delete a child made with ``apply`` (ConfigMap, Service, ServiceAccount, Role,
        RoleBinding); gone already is fine."""
        calls = {
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Service": self.core.delete_namespaced_service,
            "ServiceAccount": self.core.delete_namespaced_service_account,
            "Role": self.rbac.delete_namespaced_role,
            "RoleBinding": self.rbac.delete_namespaced_role_binding,
        }
        try:
            await _read(calls[kind](name, ns, **RAW))
        except ApiException as e:
            if e.status != 404:
                raise api_error(e, f"delete {kind} {ns}/{name}") from e

    async def create_secret(self, secret: dict[str, Any]) -> bool:
        """Create a Secret the operator generates; False when it exists already (its
        content is kept: the operator never reads its own Secrets back)."""
        ns, name = secret["metadata"]["namespace"], secret["metadata"]["name"]
        try:
            body: Any = secret  # the client sends a dict as it is
            await _read(self.core.create_namespaced_secret(ns, body, **RAW))
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise api_error(e, f"create Secret {ns}/{name}") from e

    async def secret_keys(self, namespace: str, name: str) -> frozenset[str] | None:
        """The keys of a Secret a spec names (None when it does not exist), to say so on
        the resource instead of leaving pods stuck mounting it. The values are dropped
        here, never returned, logged or stored."""
        try:
            secret = await _json(self.core.read_namespaced_secret(name, namespace, **RAW))
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read Secret {namespace}/{name}") from e
        return frozenset(secret.get("data") or {})

    async def create_pod(self, pod: dict[str, Any]) -> bool:
        """Create a pod; False when one of that name already exists (no duplicates)."""
        ns = pod["metadata"]["namespace"]
        try:
            body: Any = pod  # the client sends a dict as it is
            await _read(self.core.create_namespaced_pod(ns, body, **RAW))
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            if e.status == 403 and "NamespaceTerminating" in str(e.body):
                return False  # the namespace, and the job with it, is going away
            raise api_error(e, f"create Pod {ns}/{pod['metadata']['name']}") from e

    async def delete_pod(self, ns: str, name: str, *, grace_seconds: int | None = None) -> None:
        try:
            kw: dict[str, Any] = {"propagation_policy": "Background", **RAW}
            if grace_seconds is not None:
                kw["grace_period_seconds"] = grace_seconds
            await _read(self.core.delete_namespaced_pod(name, ns, **kw))
        except ApiException as e:
            if e.status != 404:
                raise api_error(e, f"delete Pod {ns}/{name}") from e

    async def list_pods(self, ns: str, selector: str) -> list[dict[str, Any]]:
        try:
            res = await _json(self.core.list_namespaced_pod(ns, label_selector=selector, **RAW))
        except ApiException as e:
            raise api_error(e, f"list Pods in {ns}") from e
        return list(res.get("items") or [])

    async def get_config_map(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return await _json(self.core.read_namespaced_config_map(name, ns, **RAW))
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read ConfigMap {ns}/{name}") from e

    async def get_node(self, name: str) -> dict[str, Any] | None:
        try:
            return await _json(self.core.read_node(name, **RAW))
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read Node {name}") from e

    async def get_custom(
        self, api_version: str, kind: str, ns: str, name: str
    ) -> dict[str, Any] | None:
        group, version = api_version.split("/")
        try:
            return await _json(
                self.custom.get_namespaced_custom_object(
                    group, version, ns, _CUSTOM[(api_version, kind)], name, **RAW
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read {kind} {ns}/{name}") from e

    async def list_custom(self, api_version: str, kind: str, ns: str) -> list[dict[str, Any]]:
        group, version = api_version.split("/")
        try:
            res = await _json(
                self.custom.list_namespaced_custom_object(
                    group, version, ns, _CUSTOM[(api_version, kind)], **RAW
                )
            )
        except ApiException as e:
            raise api_error(e, f"list {kind} in {ns}") from e
        return list(res.get("items") or [])

    async def patch_status(
        self, api_version: str, kind: str, ns: str, name: str, status: dict[str, Any]
    ) -> str | None:
        """Merge-patch the status subresource (None values delete keys); the object's new
        resourceVersion (None when it is gone), without parsing the rest of the answer."""
        group, version = api_version.split("/")
        try:
            out = await _read(
                self.custom.patch_namespaced_custom_object_status(
                    group,
                    version,
                    ns,
                    _CUSTOM[(api_version, kind)],
                    name,
                    {"status": omit_empty_strings(status)},
                    _content_type=MERGE,  # type: ignore[call-arg]  # accepted at run time
                    **RAW,
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None  # deleted meanwhile: nothing to report on
            raise api_error(e, f"patch status of {kind} {ns}/{name}") from e
        m = _RESOURCE_VERSION.search(out)
        return m.group(1).decode() if m else None
