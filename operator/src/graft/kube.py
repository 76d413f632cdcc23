"""The one module that talks to the Kubernetes API (Kopf's own traffic aside).

Server-side apply with one field manager for children we own, create-ignore-409 for pods
(pods are immutable: a new attempt is new pods), delete-ignore-404, merge-patches of status.
Results are plain dicts in the API's camelCase shape, so builders and tests compare them
with what they rendered.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from graft.errors import api_error

FIELD_MANAGER = "graft-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"

log = logging.getLogger(__name__)

# apiVersion/kind -> plural, for the custom resources we read or write.
_CUSTOM = {
    ("graft.dev/v1alpha1", "FineTuneJob"): "finetunejobs",
    ("graft.dev/v1alpha1", "ModelService"): "modelservices",
    ("ray.io/v1", "RayService"): "rayservices",
}


def _omit_empty_strings(obj: Any, in_list: bool = False) -> Any:
    """Drop "" values from objects inside lists.

    The Kubernetes 1.20 apiserver the tests run on turns an empty string inside a list
    item of a merge patch into null and then refuses it ("must be of type string"); an
    absent optional field means the same as an empty one to every reader.
    """
    if isinstance(obj, dict):
        return {
            k: _omit_empty_strings(v, False) for k, v in obj.items() if not (in_list and v == "")
        }
    if isinstance(obj, list):
        return [_omit_empty_strings(v, True) for v in obj]
    return obj


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
        return cls(client.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self.api.close()

    def _plain(self, obj: Any) -> dict[str, Any]:
        out = self.api.sanitize_for_serialization(obj)
        assert isinstance(out, dict)
        return out

    # -- generic -----------------------------------------------------------------------
    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` (ConfigMap, Service or a custom resource)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        kw: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY}
        try:
            if kind == "ConfigMap":
                return self._plain(await self.core.patch_namespaced_config_map(name, ns, obj, **kw))
            if kind == "Service":
                return self._plain(await self.core.patch_namespaced_service(name, ns, obj, **kw))
            if kind == "ServiceAccount":
                return self._plain(
                    await self.core.patch_namespaced_service_account(name, ns, obj, **kw)
                )
            if kind == "Role":
                return self._plain(await self.rbac.patch_namespaced_role(name, ns, obj, **kw))
            if kind == "RoleBinding":
                return self._plain(
                    await self.rbac.patch_namespaced_role_binding(name, ns, obj, **kw)
                )
            if kind == "Lease":
                return self._plain(
                    await self.coordination.patch_namespaced_lease(name, ns, obj, **kw)
                )
            if kind == "NetworkPolicy":
                return self._plain(
                    await self.networking.patch_namespaced_network_policy(name, ns, obj, **kw)
                )
            group, version = obj["apiVersion"].split("/")
            plural = _CUSTOM[(obj["apiVersion"], kind)]
            out: dict[str, Any] = await self.custom.patch_namespaced_custom_object(
                group, version, ns, plural, name, obj, **kw
            )
            return out
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
            await calls[kind](name, ns)
        except ApiException as e:
            if e.status != 404:
                raise api_error(e, f"delete {kind} {ns}/{name}") from e

    async def create_secret(self, secret: dict[str, Any]) -> bool:
        """Create a Secret the operator generates; False when it exists already (its
        content is kept: the operator never reads its own Secrets back)."""
        ns, name = secret["metadata"]["namespace"], secret["metadata"]["name"]
        try:
            await self.core.create_namespaced_secret(ns, secret)  # type: ignore[arg-type]
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
            secret = await self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read Secret {namespace}/{name}") from e
        return frozenset(secret.data or {})

    async def create_pod(self, pod: dict[str, Any]) -> bool:
        """Create a pod; False when one of that name already exists (no duplicates)."""
        ns = pod["metadata"]["namespace"]
        try:
            await self.core.create_namespaced_pod(ns, pod)  # type: ignore[arg-type]
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            if e.status == 403 and "NamespaceTerminating" in str(e.body):
                return False  # the namespace, and the job with it, is going away
            raise api_error(e, f"create Pod {ns}/{pod['metadata']['name']}") from e

    async def delete_pod(self, ns: str, name: str, *, grace_seconds: int | None = None) -> None:
        try:
            kw: dict[str, Any] = {"propagation_policy": "Background"}
            if grace_seconds is not None:
                kw["grace_period_seconds"] = grace_seconds
            await self.core.delete_namespaced_pod(name, ns, **kw)
        except ApiException as e:
            if e.status != 404:
                raise api_error(e, f"delete Pod {ns}/{name}") from e

    async def list_pods(self, ns: str, selector: str) -> list[dict[str, Any]]:
        try:
            res = await self.core.list_namespaced_pod(ns, label_selector=selector)
        except ApiException as e:
            raise api_error(e, f"list Pods in {ns}") from e
        return [self._plain(p) for p in res.items]

    async def get_config_map(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(await self.core.read_namespaced_config_map(name, ns))
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read ConfigMap {ns}/{name}") from e

    async def get_node(self, name: str) -> dict[str, Any] | None:
        try:
            return self._plain(await self.core.read_node(name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read Node {name}") from e

    async def get_custom(
        self, api_version: str, kind: str, ns: str, name: str
    ) -> dict[str, Any] | None:
        group, version = api_version.split("/")
        try:
            out: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                group, version, ns, _CUSTOM[(api_version, kind)], name
            )
            return out
        except ApiException as e:
            if e.status == 404:
                return None
            raise api_error(e, f"read {kind} {ns}/{name}") from e

    async def list_custom(self, api_version: str, kind: str, ns: str) -> list[dict[str, Any]]:
        group, version = api_version.split("/")
        try:
            res = await self.custom.list_namespaced_custom_object(
                group, version, ns, _CUSTOM[(api_version, kind)]
            )
        except ApiException as e:
            raise api_error(e, f"list {kind} in {ns}") from e
        return list(res.get("items", []))

    async def patch_status(
        self, api_version: str, kind: str, ns: str, name: str, status: dict[str, Any]
    ) -> None:
        """Merge-patch the status subresource (None values delete keys)."""
        group, version = api_version.split("/")
        try:
            await self.custom.patch_namespaced_custom_object_status(
                group,
                version,
                ns,
                _CUSTOM[(api_version, kind)],
                name,
                {"status": _omit_empty_strings(status)},
                _content_type=MERGE,  # type: ignore[call-arg]  # accepted at run time, not in the stub
            )
        except ApiException as e:
            if e.status == 404:
                return  # deleted meanwhile: nothing to report on
            raise api_error(e, f"patch status of {kind} {ns}/{name}") from e
