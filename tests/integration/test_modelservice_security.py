"""A ModelService's serving cluster closed on a real control plane: Ray token Secret,
NetworkPolicy, API key mount, restricted pods the apiserver accepts, bounded quantities."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kubernetes import client
from test_modelservice_controller import KUBERAY, Api, msvc

from graft.builders import rayservice as rs
from graft.testing.cluster import wait_for
from graft.testing.kuberay_pods import kuberay_pods
from graft.testing.operator import OperatorProcess

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not KUBERAY.is_dir(), reason=f"KubeRay CRDs not found at {KUBERAY}"),
]


@pytest.fixture
def sec_api(k8s: client.ApiClient, namespace: str, operator_process: OperatorProcess) -> Api:
    return Api(k8s, namespace)


def _quantities_as_strings(obj: Any, parent: str = "") -> Any:
    # The apiserver takes int-or-string quantities; this Python client's models want strings.
    if isinstance(obj, dict):
        if parent in ("limits", "requests"):
            return {k: str(v) for k, v in obj.items()}
        return {k: _quantities_as_strings(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_quantities_as_strings(v) for v in obj]
    return obj


def _get(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def test_serving_cluster_is_closed(sec_api: Api, k8s: client.ApiClient) -> None:
    api = sec_api
    core, net = client.CoreV1Api(k8s), client.NetworkingV1Api(k8s)
    spec = {
        "auth": {"apiKeySecretRef": {"name": "chat-keys", "key": "keys"}},
        "network": {"allowFromNamespaces": ["web"]},
    }
    core.create_namespaced_secret(
        api.ns, {"metadata": {"name": "chat-keys"}, "stringData": {"keys": "k-1\n"}}
    )
    api.create("modelservices", msvc("sec", [], **spec))
    rsvc = wait_for("RayService", lambda: api.rayservice("sec"))
    owner = api.msvc("sec")["metadata"]["uid"]
    cluster = rsvc["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "sec-ray-token"}

    secret = wait_for(
        "token Secret", lambda: _get(core.read_namespaced_secret, "sec-ray-token", api.ns)
    )
    token = base64.b64decode(secret.data["auth_token"]).decode()
    assert len(token) >= 32
    assert [r.uid for r in secret.metadata.owner_references] == [owner]

    policy = wait_for(
        "NetworkPolicy", lambda: _get(net.read_namespaced_network_policy, "sec-ray", api.ns)
    )
    assert [r.uid for r in policy.metadata.owner_references] == [owner]
    assert policy.spec.pod_selector.match_labels == {"graft.dev/modelservice": "sec"}
    ports = [[p.port for p in (rule.ports or [])] for rule in policy.spec.ingress]
    assert ports == [[], [8265], [8000]]

    # Every Ray pod KubeRay would make from it passes the apiserver's own validation.
    for role, pod_spec in kuberay_pods(_quantities_as_strings(rsvc)).items():
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"sec-{role}"},
            "spec": pod_spec,
        }
        core.create_namespaced_pod(api.ns, pod, dry_run="All")

    # A change of spec.network alone updates the policy; the token stays what it was.
    api.custom.patch_namespaced_custom_object(
        "graft.dev",
        "v1alpha1",
        api.ns,
        "modelservices",
        "sec",
        {"spec": {"network": {"allowFromNamespaces": ["web", "gateway"]}}},
    )

    def widened() -> Any:
        p = net.read_namespaced_network_policy("sec-ray", api.ns)
        return len(p.spec.ingress[2]._from) == 4 and p

    wait_for("NetworkPolicy updated", widened)
    again = core.read_namespaced_secret("sec-ray-token", api.ns)
    assert base64.b64decode(again.data["auth_token"]).decode() == token


def test_unbounded_quantity_is_refused_by_the_schema(sec_api: Api) -> None:
    body = msvc("huge", [], resources={"gpusPerReplica": 1, "memory": "1" + "0" * 400})
    with pytest.raises(client.ApiException) as exc:
        sec_api.create("modelservices", body)
    assert exc.value.status == 422
    assert "spec.resources.memory" in str(exc.value.body)


@pytest.mark.parametrize("name", ["llama.v2", "7b-chat"])
def test_names_with_a_dot_or_a_leading_digit_render_valid_kuberay_names(
    sec_api: Api, k8s: client.ApiClient, name: str
) -> None:
    """Every object KubeRay makes from the RayService (the RayCluster ``<rs>-<5 chars>``, its
    head Service and the Serve Service, all named after the RayService) and every object the
    operator makes passes the real apiserver's validation (dry run): Service names are
    DNS-1035 labels, which ``llama.v2`` and ``7b-chat`` are not."""
    api = sec_api
    core, net = client.CoreV1Api(k8s), client.NetworkingV1Api(k8s)
    rs_name = rs.rayservice_name_for(name)
    assert rs_name != name
    api.create("modelservices", msvc(name, []))
    rsvc = wait_for("RayService", lambda: api.rayservice(rs_name))
    assert rsvc["metadata"]["ownerReferences"][0]["name"] == name
    assert rsvc["metadata"]["labels"]["graft.dev/modelservice"] == name
    assert rsvc["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == f"{rs_name}-ray-token"
    wait_for(
        "token Secret", lambda: _get(core.read_namespaced_secret, f"{rs_name}-ray-token", api.ns)
    )
    wait_for(
        "NetworkPolicy", lambda: _get(net.read_namespaced_network_policy, f"{rs_name}-ray", api.ns)
    )

    cluster = f"{rs_name}-abcde"
    api.custom.create_namespaced_custom_object(
        "ray.io",
        "v1",
        api.ns,
        "rayclusters",
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {"name": cluster},
            "spec": rsvc["spec"]["rayClusterConfig"],
        },
        dry_run="All",
    )
    port = {"ports": [{"name": "serve", "port": 8000}], "selector": {"ray.io/cluster": cluster}}
    for svc in (f"{cluster}-head-svc", f"{rs_name}-serve-svc"):
        core.create_namespaced_service(
            api.ns, {"metadata": {"name": svc}, "spec": port}, dry_run="All"
        )
    for role, pod_spec in kuberay_pods(_quantities_as_strings(rsvc)).items():
        pod = {"metadata": {"name": f"{cluster}-{role}"}, "spec": pod_spec}
        core.create_namespaced_pod(api.ns, pod, dry_run="All")
    api.write_status_as_kuberay(rs_name, ready=True)
    endpoint = wait_for("endpoint", lambda: api.msvc(name).get("status", {}).get("endpoint"))
    assert endpoint == f"http://{rs_name}-serve-svc.{api.ns}.svc:8000/v1"


def test_missing_api_key_secret_is_a_condition_and_the_service_deploys_once_it_appears(
    sec_api: Api, k8s: client.ApiClient
) -> None:
    api, core = sec_api, client.CoreV1Api(k8s)
    spec = {"auth": {"apiKeySecretRef": {"name": "team-keys", "key": "keys"}}}
    api.create("modelservices", msvc("keyless", [], **spec))

    def auth(reason: str) -> Any:
        c = api.cond("keyless", "AuthReady")
        return c if c and c["reason"] == reason else None

    c = wait_for("AuthReady=False", lambda: auth("ApiKeySecretNotFound"))
    assert c["status"] == "False" and "create secret generic team-keys" in c["message"]
    ready = api.cond("keyless", "Ready")
    assert ready is not None and ready["reason"] == "ApiKeySecretNotFound"
    assert api.rayservice("keyless") is None

    def warned(reason: str) -> list[Any]:
        sel = f"involvedObject.name=keyless,reason={reason}"
        return list(core.list_namespaced_event(api.ns, field_selector=sel).items)

    assert len(wait_for("Warning Event", lambda: warned("ApiKeySecretNotFound"))) == 1

    # the Secret appears without the key, then gets it: no spec change, the operator notices
    core.create_namespaced_secret(
        api.ns, {"metadata": {"name": "team-keys"}, "stringData": {"other": "x"}}
    )
    c = wait_for("key missing", lambda: auth("ApiKeyNotInSecret"), timeout=30)
    assert "has no key 'keys' (it has: other)" in c["message"]
    core.patch_namespaced_secret("team-keys", api.ns, {"stringData": {"keys": "k-1\n"}})
    wait_for("RayService", lambda: api.rayservice("keyless"), timeout=30)
    c = api.cond("keyless", "AuthReady")
    assert c is not None and c["status"] == "True"
    assert len(warned("ApiKeySecretNotFound")) == 1 and len(warned("ApiKeyNotInSecret")) == 1
