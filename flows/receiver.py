"""`recycler receive`: the HTTP intake of release announcements, emitting one Prefect event per release.

    POST /hooks/hub        a Hugging Face Hub webhook; the secret in `X-Webhook-Secret`
    POST /hooks/s3         an S3/MinIO bucket notification (or an EventBridge event);
                           the secret as `Authorization: Bearer <secret>` (MinIO's auth_token)
    POST /hooks/announce   `{"source": …, "version": …}` from a publisher (a folder copied, a CI job);
                           the secret as for /hooks/s3
    GET  /healthz          200 while the process serves

Each request is checked in this order, and refused at the first failure: rate per client (429), body
size (413), secret (401 missing, 403 wrong; compared in constant time), JSON (400), shape (422).
Accepted requests get 202 with what they announced, what was a duplicate and what was ignored and
why (another repo, a deleted tag, an upload not complete yet), so the sender does not retry them;
503 when the store or the Prefect API cannot be reached (the sender retries later, the watcher
reconciles meanwhile). S3 notifications are answered at once with their releases `pending`: a
release is checked when its upload has paused for `settle` seconds (a debounce per release), so the
tokenizer files that land after the weights are in its fingerprint, and announced then (logged as
`… settled → 202`; nobody waits for that answer, a failure is logged and left to the watcher's
schedule). Log lines carry method, path, status and reason, never headers, query strings or bodies:
a secret sent to the wrong place is not written anywhere.

The parsing, routing and completeness rule live in recycler.service (intake, routes, announce,
limits); this module adds HTTP and Prefect.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from recycler.errors import InvalidReleaseId
from recycler.service import announce, intake
from recycler.service.announce import Announcement, CheckRelease
from recycler.service.limits import QuietPeriod, RateLimit, RecentKeys
from recycler.service.routes import RouteTable

log = logging.getLogger("recycler.receiver")
SECRET_ENV = "RECYCLER_WEBHOOK_SECRET"
Emit = Callable[[Announcement], None]


class Unavailable(Exception):
    """The store or the Prefect API did not answer: 503, the sender retries."""


@dataclass
class Limits:
    max_body: int = 256 * 1024  # bytes; a Hub payload or an S3 record is a few KB
    per_second: float = 20.0  # requests per client and second, after a burst of …
    burst: int = 200  # … one notification per object: a release of many shards arrives at once
    remember: int = 4096  # release keys announced lately (replays answered, not re-emitted)
    settle: float = 2.0  # seconds an S3 upload must pause before its release is checked (0: at once)


@dataclass
class Receiver:
    routes: RouteTable
    secret: str
    emit: Emit
    check: CheckRelease
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError(f"the receiver needs a secret ({SECRET_ENV})")
        self.rate = RateLimit(self.limits.per_second, self.limits.burst)
        self.seen = RecentKeys(self.limits.remember)
        self.quiet = QuietPeriod(self.limits.settle, self._settled)
        self.emit_lock = threading.Lock()

    def handle(self, kind: str, body: bytes, secret: str | None) -> tuple[int, dict[str, Any]]:
        """Status and answer for a request whose size and rate were accepted (blocking: I/O)."""
        if not secret:
            return 401, {"error": "missing secret"}
        if not intake.secret_matches(secret, self.secret):
            return 403, {"error": "wrong secret"}
        try:
            payload = intake.parse_json(body)
            if kind == "s3" and self.limits.settle > 0:  # checked once the upload pauses
                objects, ignored = intake.s3_objects(payload)
                todo, more = announce.routed_versions(self.routes, objects)
                for pair in todo:
                    self.quiet.touch(pair)
                pending = [f"{r.family}@{v}" for r, v in todo]
                return 202, {"announced": [], "pending": pending, "duplicates": [], "ignored": ignored + more}
            found, ignored = self._announcements(kind, payload)
        except intake.BadPayload as e:
            return e.status, {"error": str(e)}
        except InvalidReleaseId as e:
            return 422, {"error": str(e)}
        except Unavailable as e:
            return 503, {"error": str(e)}
        return self._emit(found, ignored)

    def _settled(self, pair: object) -> None:
        """An upload paused for `settle` seconds: announce its release if it is complete now. Nobody
        waits for an answer: a failure is logged, and the watcher's schedule reconciles."""
        route, version = pair  # type: ignore[misc]
        try:
            found, ignored = announce.checked([(route, version)], self.check, "s3", [])
            status, answer = self._emit(found, ignored)
        except Exception as e:
            status, answer = 503, {"error": f"{type(e).__name__} (left to the watcher's schedule)"}
        why = answer.get("error") or f"announced {answer['announced']}, duplicates {answer['duplicates']}, ignored {answer['ignored']}"  # fmt: skip
        log.log(logging.INFO if status == 202 else logging.WARNING, "%s@%s settled → %d: %s", route.family, version, status, why)  # fmt: skip

    def _emit(self, found: list[Announcement], ignored: list[str]) -> tuple[int, dict[str, Any]]:
        announced, duplicates = [], []
        for a in found:
            with self.emit_lock:  # one emission per key, however many requests race
                if a.key in self.seen:
                    duplicates.append(a.key)
                    continue
                try:
                    self.emit(a)
                except Exception as e:
                    return 503, {"error": f"event not accepted by Prefect ({type(e).__name__})", "announced": announced}  # fmt: skip
                self.seen.add(a.key)
            announced.append(a.key)
        return 202, {"announced": announced, "duplicates": duplicates, "ignored": ignored}

    def _announcements(self, kind: str, payload: Any) -> tuple[list[Announcement], list[str]]:
        if kind == "hub":
            refs, ignored = intake.hub_refs(payload)
            found, more = announce.from_hub(self.routes, refs)
            return found, ignored + more
        try:
            if kind == "s3":
                objects, ignored = intake.s3_objects(payload)
                found, more = announce.from_objects(self.routes, objects, self.check)
                return found, ignored + more
            source, version = (payload.get(k) if isinstance(payload, dict) else None for k in ("source", "version"))  # fmt: skip
            if not isinstance(source, str) or not isinstance(version, str):
                raise intake.BadPayload(422, 'expected {"source": …, "version": …}')
            return announce.from_request(self.routes, source, version, self.check)
        except (intake.BadPayload, InvalidReleaseId):
            raise
        except Exception as e:  # the store did not answer: the sender should retry
            raise Unavailable(f"release source not reachable ({type(e).__name__})") from None

    def app(self) -> Starlette:
        async def endpoint(request: Request) -> JSONResponse:
            kind = request.url.path.rsplit("/", 1)[-1]
            status, answer = await self._serve(request, kind)
            why = answer.get("error") or ", ".join(f"{k} {answer[k]}" for k in ("announced", "pending", "duplicates") if answer.get(k)) + f" ({len(answer.get('ignored', []))} ignored)"  # fmt: skip
            log.info(
                "%s %s from %s → %d: %s", request.method, request.url.path, _client(request), status, why
            )
            return JSONResponse(answer, status_code=status)

        async def healthz(_request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        return Starlette(
            routes=[
                Route("/hooks/hub", endpoint, methods=["POST"]),
                Route("/hooks/s3", endpoint, methods=["POST"]),
                Route("/hooks/announce", endpoint, methods=["POST"]),
                Route("/healthz", healthz, methods=["GET"]),
            ]
        )

    async def _serve(self, request: Request, kind: str) -> tuple[int, dict[str, Any]]:
        if not self.rate.allow(_client(request)):
            return 429, {"error": "too many requests"}
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body):
            return 413, {"error": f"body larger than {self.limits.max_body} bytes"}
        body = bytearray()
        async for chunk in request.stream():  # a chunked body is counted as it arrives
            body += chunk
            if len(body) > self.limits.max_body:
                return 413, {"error": f"body larger than {self.limits.max_body} bytes"}
        header = "x-webhook-secret" if kind == "hub" else "authorization"
        given = request.headers.get(header)
        secret = given if kind == "hub" else intake.bearer(given)
        return await run_in_threadpool(self.handle, kind, bytes(body), secret)


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def prefect_emitter() -> Emit:
    """POST each event to the Prefect API (`/events`) and raise if it is not accepted, so the sender
    is told to retry (`emit_event` would queue it in a background worker and drop it on failure)."""
    from prefect.client.orchestration import get_client
    from prefect.events import Event

    client = get_client(sync_client=True)
    client.__enter__()

    def emit(a: Announcement) -> None:
        event = Event(**a.event())
        client.request("POST", "/events", json=[event.model_dump(mode="json")])  # type: ignore[arg-type]

    return emit


def receiver_from_env(routes: RouteTable, emit: Emit | None = None, limits: Limits | None = None) -> Receiver:
    """A receiver with the secret from RECYCLER_WEBHOOK_SECRET, the store from the settings and the
    Prefect API from PREFECT_API_URL."""
    import os

    from recycler.errors import InvalidConfig
    from recycler.settings import get_settings

    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        raise InvalidConfig(f"set {SECRET_ENV} to a random secret of at least 16 characters (e.g. `openssl rand -hex 24`); the same value goes into the Hub webhook's secret and MinIO's auth_token")  # fmt: skip
    check = announce.check_in_store(get_settings().s3_endpoint_url)
    return Receiver(routes, secret, emit or prefect_emitter(), check, limits or Limits())


def start_in_thread(app: Starlette, host: str, port: int) -> Any:
    """Serve `app` with uvicorn on a daemon thread (beside `recycler serve`); returns the server."""
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, name="recycler-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"the receiver did not start on {host}:{port}")
    return server
