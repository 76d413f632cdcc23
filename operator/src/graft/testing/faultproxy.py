"""A fault-injecting HTTP proxy in front of the test apiserver (test use only).

The 1.20 test apiserver has no way to fail a request on purpose short of an admission
webhook, and the errors worth testing are the ones a real cluster gives for a moment: a
500 while the token controller has not yet made a new ServiceAccount's token, a 409 from a
lost race. ``FaultProxy`` sits between the operator and the apiserver (the operator gets a
kubeconfig pointing at it): every request is forwarded as it is, responses and watch
streams included, except the first ``times`` requests that match a ``Fault``, which get
the fault's status and a Kubernetes ``Status`` body instead. Nothing in the operator knows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import threading
from pathlib import Path
from typing import Any

from aiohttp import ClientConnectionResetError, ClientSession, ClientTimeout, TCPConnector, web

from graft.testing.controlplane import ADMIN_TOKEN, ControlPlane, free_port

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "upgrade",
    "host",
}
_REASONS = {409: "AlreadyExists", 500: "InternalError", 503: "ServiceUnavailable"}


@dataclasses.dataclass
class Fault:
    """Answer the first ``times`` requests with ``method`` whose path matches ``path``
    (a regular expression searched in the path) with ``status`` and ``message``."""

    method: str
    path: str
    status: int
    message: str
    times: int = 1
    #: Requests answered with the fault so far.
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.hits < self.times and method == self.method and bool(re.search(self.path, path))


class FaultProxy:
    """Runs in a thread of its own; ``kubeconfig`` is what the operator is given."""

    def __init__(self, cp: ControlPlane, faults: list[Fault], workdir: Path) -> None:
        self.cp = cp
        self.faults = faults
        self.port = free_port()
        self.kubeconfig = workdir / "faultproxy-kubeconfig"
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: proxy, cluster: {{server: 'http://127.0.0.1:{self.port}'}}}}]\n"
            f"users: [{{name: admin, user: {{token: {ADMIN_TOKEN}}}}}]\n"
            "contexts: [{name: proxy, context: {cluster: proxy, user: admin}}]\n"
            "current-context: proxy\n"
        )
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    f.hits += 1
                    return f
        return None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        tls = ssl.create_default_context(cafile=str(self.cp.ca_file))
        session = ClientSession(
            connector=TCPConnector(ssl=tls, limit=0),
            timeout=ClientTimeout(total=None, sock_read=None),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{tail:.*}", lambda r: self._handle(r, session))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await session.close()

    async def _handle(self, request: web.Request, session: ClientSession) -> web.StreamResponse:
        fault = self._fault_for(request.method, request.path)
        if fault is not None:
            body: dict[str, Any] = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": fault.message,
                "reason": _REASONS.get(fault.status, "InternalError"),
                "code": fault.status,
            }
            return web.json_response(body, status=fault.status)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        payload = await request.read()
        # no body, no data: aiohttp would add a Content-Type that makes /api answer 406
        async with session.request(
            request.method,
            self.cp.server + request.path_qs,
            headers=headers,
            data=payload or None,
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP},
            )
            try:
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (ConnectionResetError, ClientConnectionResetError, asyncio.CancelledError):
                return response
            await response.write_eof()
            return response
