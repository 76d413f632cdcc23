"""The baseline of ``reconcile_scale.py``: a minimal hand-written asyncio FineTuneJob controller.

It makes the same writes as graft-operator for the same objects, built by graft's own
``decide`` and builders: one raw aiohttp session (no typed models, no proxy lookups), one
namespaced watch on FineTuneJobs parsed as plain JSON, a queue with 16 workers, and per job
one pass when a spec is first seen or changes (a digest of the spec and deletion). A pass
applies the children (server-side apply, one field manager), creates the Pods (409 is fine),
merge-patches status once with ``status_patch`` and posts the plan's Events. What it leaves
out is what graft-operator adds on top: Pods, Leases and Nodes are not watched (the bench's
Pods mostly stay Pending), there are no timers or retries beyond a fixed one, no restart
handling beyond a fresh list, no metrics.

    KUBECONFIG=... GRAFT_NODE_POOLS=... HANDWRITTEN_NAMESPACE=ns HANDWRITTEN_STATS=file \\
        python bench/handwritten_controller.py

Every second it writes ``{"passes": n, "errors": n}`` to HANDWRITTEN_STATS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from graft.api.common import API_VERSION
from graft.config import load_settings
from graft.kube import FIELD_MANAGER, omit_empty_strings
from graft.reconcile.common import status_patch
from graft.reconcile.finetunejob import World, decide_or_report

USER_AGENT = "handwritten-controller"
WORKERS = 16
# apiVersion/kind -> URL path of a namespaced collection
PATHS = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{ns}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "ServiceAccount"): "/api/v1/namespaces/{ns}/serviceaccounts",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    (
        "rbac.authorization.k8s.io/v1",
        "Role",
    ): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
    ): "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    ("coordination.k8s.io/v1", "Lease"): "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
    ): "/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies",
}
JOBS = "/apis/graft.dev/v1alpha1/namespaces/{ns}/finetunejobs"


class Controller:
    def __init__(self, kubeconfig: Path, ns: str, stats: Path) -> None:
        cfg = yaml.safe_load(kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.ssl = ssl.create_default_context(cafile=cluster["certificate-authority"])
        self.headers = {
            "Authorization": f"Bearer {cfg['users'][0]['user']['token']}",
            "User-Agent": USER_AGENT,
        }
        self.ns, self.stats = ns, stats
        self.settings = load_settings()
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self.bodies: dict[str, dict[str, Any]] = {}  # latest body of queued jobs only
        self.digests: dict[str, int] = {}
        self.passes = self.errors = 0
        self.session: aiohttp.ClientSession | None = None

    async def request(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json", **q: str
    ) -> tuple[int, bytes]:
        assert self.session is not None
        data = json.dumps(body) if body is not None else None
        async with self.session.request(
            method,
            self.server + path,
            params=q or None,
            data=data,
            headers={"Content-Type": ctype},
            ssl=self.ssl,
        ) as r:
            return r.status, await r.read()

    def _check(self, status: int, out: bytes, what: str, ok: tuple[int, ...] = ()) -> None:
        if not (200 <= status <= 299 or status in ok):
            raise RuntimeError(f"{what}: {status} {out[:300]!r}")

    async def apply(self, obj: dict[str, Any]) -> None:
        path = PATHS[(obj["apiVersion"], obj["kind"])].format(ns=self.ns)
        name = obj["metadata"]["name"]
        status, out = await self.request(
            "PATCH",
            f"{path}/{name}",
            obj,
            "application/apply-patch+yaml",
            fieldManager=FIELD_MANAGER,
            force="true",
        )
        self._check(status, out, f"apply {obj['kind']} {name}")

    async def event(self, owner: dict[str, Any], kind: str, reason: str, message: str) -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        meta = owner["metadata"]
        ev = {
            "metadata": {"namespace": self.ns, "generateName": "graft-event-"},
            "action": "Action",
            "type": kind,
            "reason": reason,
            "message": message[:1000],
            "reportingComponent": USER_AGENT,
            "reportingInstance": USER_AGENT,
            "source": {"component": USER_AGENT},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": now,
            "involvedObject": {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": meta["name"],
                "uid": meta["uid"],
                "namespace": self.ns,
            },
        }
        status, out = await self.request("POST", f"/api/v1/namespaces/{self.ns}/events", ev)
        self._check(status, out, f"event {reason}")

    async def one_pass(self, name: str) -> None:
        body = self.bodies.pop(name)
        world = World(job=body, pods=[], nodes={}, now=dt.datetime.now(dt.UTC))
        plan = decide_or_report(world, self.settings)
        meta = body["metadata"]
        ref = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        for obj in plan.apply:
            obj["metadata"].setdefault("ownerReferences", []).append(dict(ref))
            await self.apply(obj)
        for pod in plan.create_pods:
            pod["metadata"].setdefault("ownerReferences", []).append(dict(ref))
            status, out = await self.request("POST", f"/api/v1/namespaces/{self.ns}/pods", pod)
            self._check(status, out, f"create Pod {pod['metadata']['name']}", ok=(409,))
        patch = status_patch(dict(body.get("status") or {}), plan.status)
        if patch:
            status, out = await self.request(
                "PATCH",
                f"{JOBS.format(ns=self.ns)}/{name}/status",
                {"status": omit_empty_strings(patch)},
                "application/merge-patch+json",
            )
            self._check(status, out, f"patch status {name}", ok=(404,))
        for kind, reason, message in plan.events:
            await self.event(body, kind, reason, message)
        self.passes += 1

    async def worker(self) -> None:
        while True:
            name = await self.queue.get()
            self.queued.discard(name)
            try:
                await self.one_pass(name)
            except Exception as e:
                self.errors += 1
                print(f"pass {name} failed: {e}", file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)
                await self.get_and_enqueue(name)

    async def get_and_enqueue(self, name: str) -> None:
        status, out = await self.request("GET", f"{JOBS.format(ns=self.ns)}/{name}")
        if status == 200:
            self.enqueue(json.loads(out))

    def enqueue(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        self.bodies[name] = body
        if name not in self.queued:
            self.queued.add(name)
            self.queue.put_nowait(name)

    def seen(self, body: dict[str, Any]) -> bool:
        """True when a pass already saw this spec (a status echo of our own write)."""
        name, meta = body["metadata"]["name"], body["metadata"]
        digest = hash((meta.get("generation"), meta.get("deletionTimestamp"), meta.get("uid")))
        if self.digests.get(name) == digest:
            return True
        self.digests[name] = digest
        return False

    async def watch(self) -> None:
        path = JOBS.format(ns=self.ns)
        status, out = await self.request("GET", path)
        self._check(status, out, "list FineTuneJobs")
        listed = json.loads(out)
        for item in listed["items"]:
            item.setdefault("apiVersion", API_VERSION)
            item.setdefault("kind", "FineTuneJob")
            if not self.seen(item):
                self.enqueue(item)
        rv = listed["metadata"]["resourceVersion"]
        assert self.session is not None
        while True:
            async with self.session.get(
                self.server + path,
                params={"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true"},
                ssl=self.ssl,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
            ) as r:
                async for line in r.content:
                    if not line.strip():
                        continue
                    ev = json.loads(line)
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        raise RuntimeError(f"watch: {obj}")
                    rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] == "DELETED":
                        self.digests.pop(obj["metadata"]["name"], None)
                    elif ev["type"] != "BOOKMARK" and not self.seen(obj):
                        self.enqueue(obj)

    async def write_stats(self) -> None:
        while True:
            tmp = self.stats.with_suffix(".tmp")
            tmp.write_text(json.dumps({"passes": self.passes, "errors": self.errors}))
            tmp.replace(self.stats)
            await asyncio.sleep(1.0)

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(
            connector=connector, headers=self.headers, trust_env=False
        ) as self.session:
            tasks = [asyncio.create_task(self.worker()) for _ in range(WORKERS)]
            tasks.append(asyncio.create_task(self.write_stats()))
            tasks.append(asyncio.create_task(self.watch()))
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            for t in tasks:
                t.cancel()


def main() -> None:
    kubeconfig = Path(os.environ["KUBECONFIG"])
    ns = os.environ["HANDWRITTEN_NAMESPACE"]
    stats = Path(os.environ["HANDWRITTEN_STATS"])
    print(f"handwritten controller on {ns}, started {time.time():.3f}", flush=True)
    asyncio.run(Controller(kubeconfig, ns, stats).run())


if __name__ == "__main__":
    main()
