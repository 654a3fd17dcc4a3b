"""The browser live view, JSON API, MJPEG streams and Prometheus metrics of `agestream serve`.

An aiohttp application over a stream hub (stream.hub.StreamHub, or anything with the methods of
`Hub` below). Routes:

    GET    /                    the live page (stream/static/index.html)
    GET    /static/...          its script and style sheet (code only, no data: no token needed)
    GET    /api/streams         every stream: [{"id", "source", "state", "fps", "faces",
                                "tracks": <count>, "dropped", "frames", "latency_ms_p95",
                                "error"}]
    POST   /api/streams         {"source": ..., "id": optional} -> 201 and the stream object
    GET    /api/streams/{id}    one stream, with "tracks" the list of its people
    DELETE /api/streams/{id}    stop a stream and finalize its outputs -> 204
    GET    /api/counts          ?from=&to=&camera=&by=hour|day: people who came into view per
                                hour or day, by camera, age group and gender, with totals
    GET    /api/counts.csv      the same rows as a CSV download
    GET    /api/cameras         every camera the visits store knows: ["name", ...]
    GET    /stream/{id}.mjpg    the annotated frames, multipart/x-mixed-replace
    GET    /stream/{id}.jpg     the newest annotated frame
    GET    /metrics             Prometheus text format

With a token every route but /static/ needs it, as `Authorization: Bearer TOKEN` or `?token=TOKEN`
(an <img> cannot send headers). Every request must name this server as its Host, and one that
changes something must come from no other site and carry JSON (stream.web_guard). Errors are
JSON `{"error": "..."}` with a 4xx (5xx) status. Slow clients are bounded: headers within
HEADER_TIMEOUT_S, a body within BODY_TIMEOUT_S, at most MAX_CONNECTIONS open connections
(stream.connections).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from stream.config import ConfigError, StreamEntry
from stream.connections import ConnectionCap, RateLimiter
from stream.outputs import UTC_STAMP, json_number
from stream.types import (
    PERSON_AGE_GROUPS,
    SHOWN_GENDERS,
    UNKNOWN,
    CountRow,
    StreamIdInUse,
    StreamStatus,
    TrackStatus,
)
from stream.visits import StoreError, counts_csv, counts_json, utc_iso, utc_seconds
from stream.web_guard import HostPolicy, is_loopback, refusal

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
STATES = ("starting", "running", "reconnecting", "ended", "failed")
BOUNDARY = "agestream-frame"
COUNT_PERIODS = ("hour", "day")
COUNTS_PARAMETERS = ("from", "to", "camera", "by")
DEFAULT_COUNTS_S = 24 * 3600
MAX_COUNTS_DAYS = 366
MAX_CAMERA_CHARS = 200
LAST_UNIX_S = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime can hold
POLL_S = 0.02  # how often a viewer looks for a newer frame while there is none
WRITE_TIMEOUT_S = 5.0  # a viewer that takes longer to accept one frame is dropped
# A client gets this long to send its request line and headers (and to send the next
# request on a kept-alive connection) ...
HEADER_TIMEOUT_S = 10.0
# ... and this long for a body, which must fit in MAX_BODY_BYTES (a stream's is ~100 bytes).
BODY_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 64 * 1024
# Well under the usual 1024 file descriptors, with room for the streams' files.
MAX_CONNECTIONS = 256
MAX_SOURCE_CHARS = 2048
MAX_INT_DIGITS = 18
SECURITY_HEADERS = {
    # Nothing external may load; the token in a URL never leaks through a Referer.
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class Hub(Protocol):
    """What the web app needs of the runtime (stream.hub.StreamHub has it)."""

    def streams(self) -> list[StreamStatus]: ...
    def status(self, stream_id: str) -> StreamStatus: ...
    def add(
        self, source: str, stream_id: str | None = None, entry: StreamEntry | None = None
    ) -> StreamStatus: ...
    def remove(self, stream_id: str) -> None: ...
    def latest_jpeg(self, stream_id: str, after: int = -1) -> tuple[int, bytes] | None: ...
    def counts(
        self, start: float, end: float, camera: str | None = None, by: str = "hour"
    ) -> list[CountRow]: ...
    def cameras(self) -> list[str]: ...
    def metrics(self) -> dict: ...


class ApiError(Exception):
    """An HTTP error answered as JSON `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


HUB = web.AppKey("hub", Hub)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
REGISTRY = web.AppKey("registry", CollectorRegistry)
CLOSING = web.AppKey("closing", asyncio.Event)
TIMINGS = web.AppKey("timings", tuple)  # (poll_s, write_timeout_s, body_timeout_s)
HOSTS = web.AppKey("hosts", HostPolicy)
BUSY = web.AppKey("busy", set)  # aiohttp's handlers of the connections with a request in progress


def check_exposure(host: str, token: str | None) -> None:
    """Refuse, with ConfigError, to serve on anything but a loopback address without a token."""
    if not token and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host or 'every address'} without a token: pass --token or "
            "set AGESTREAM_TOKEN"
        )


def create_app(
    hub: Hub,
    token: str | None,
    *,
    host: str = "127.0.0.1",
    allowed_hosts: tuple[str, ...] = (),
    poll_s: float = POLL_S,
    write_timeout_s: float = WRITE_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> web.Application:
    """The live page, API, MJPEG and metrics over `hub`, served on `host`; every route but
    /static/ needs `token` when it is given (None: no token). Requests must name `host`, a
    loopback name or one of `allowed_hosts` as their Host (any, on a non-loopback `host`
    with a token and none listed)."""
    if token is not None and not token:
        raise ValueError("token must be None (no token) or a non-empty string")
    middlewares = [_json_errors, _track_busy, _guard] + ([_token_check(token)] if token else [])
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[HUB] = hub
    app[TIMINGS] = (poll_s, write_timeout_s, body_timeout_s)
    app[HOSTS] = HostPolicy.for_server(host, token, allowed_hosts)
    app[BUSY] = set()
    app[REGISTRY] = CollectorRegistry(auto_describe=False)
    app[REGISTRY].register(HubCollector(hub))
    app.on_startup.append(_start)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    app.on_response_prepare.append(_add_headers)
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/api/streams", _list_streams)
    app.router.add_post("/api/streams", _add_stream)
    app.router.add_get("/api/streams/{id}", _get_stream)
    app.router.add_delete("/api/streams/{id}", _remove_stream)
    app.router.add_get("/api/counts", _counts)
    app.router.add_get("/api/counts.csv", _counts_csv)
    app.router.add_get("/api/cameras", _cameras)
    app.router.add_get("/stream/{id}.mjpg", _mjpeg)
    app.router.add_get("/stream/{id}.jpg", _jpeg)
    app.router.add_get("/metrics", _metrics)
    return app


async def _start(app: web.Application) -> None:
    # Frame fetches (a JPEG encode each) get threads of their own, so viewers never wait
    # behind a stream being removed in the default executor.
    app[EXECUTOR] = ThreadPoolExecutor(max_workers=4, thread_name_prefix="agestream-web")
    app[CLOSING] = asyncio.Event()


async def _shutdown(app: web.Application) -> None:
    app[CLOSING].set()  # ends every MJPEG viewer loop


async def _cleanup(app: web.Application) -> None:
    app[EXECUTOR].shutdown(wait=False, cancel_futures=True)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")


def _error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """ApiError, aiohttp's own HTTP errors (unknown route, wrong method, body too large) and
    unexpected exceptions all become `{"error": ...}` responses."""
    try:
        return await handler(request)
    except ApiError as error:
        return _error_response(error.status, error.message)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {name: error.headers[name] for name in ("Allow",) if name in error.headers}
        message = {
            404: f"not found: {request.path}",
            405: f"{request.method} not allowed",
            413: f"the body is larger than {MAX_BODY_BYTES // 1024} KiB",
        }
        return _error_response(
            error.status, message.get(error.status, error.reason.lower()), headers
        )
    except Exception:
        log.exception("%s %s failed", request.method[:10], request.path[:200])
        return _error_response(500, "internal error (see the server's log)")


@web.middleware
async def _track_busy(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Marks the connection busy while its request runs: the connection cap closes only
    idle ones to make room (stream.connections.ConnectionCap)."""
    busy, protocol = request.app[BUSY], request.protocol
    busy.add(protocol)
    try:
        return await handler(request)
    finally:
        busy.discard(protocol)


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuses foreign Host names, cross-site changes and non-JSON bodies (web_guard)."""
    socket_name = request.transport.get_extra_info("sockname") if request.transport else None
    port = socket_name[1] if isinstance(socket_name, tuple) else -1
    refused = refusal(request.method, request.headers, port, request.app[HOSTS])
    if refused is not None:
        return _error_response(*refused)
    return await handler(request)


def _token_check(token: str) -> Callable:
    expected = token.encode()

    @web.middleware
    async def check_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith("/static/"):
            given = _given_token(request)
            if given is None or not hmac.compare_digest(given.encode(), expected):
                return _error_response(
                    401,
                    "missing or wrong token: send Authorization: Bearer TOKEN or add ?token=TOKEN",
                    {"WWW-Authenticate": 'Bearer realm="agestream"'},
                )
        return await handler(request)

    return check_token


def _given_token(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token")


def track_json(track: TrackStatus) -> dict[str, Any]:
    """The API's track object."""
    return {
        "track": int(track.track),
        "age": json_number(track.age, 1),
        "age_uncertainty": json_number(track.age_uncertainty, 2),
        "age_low": json_number(track.age_low, 1),
        "age_high": json_number(track.age_high, 1),
        "gender": track.gender,
        "confidence": json_number(track.confidence, 3),
        "seconds_in_view": json_number(track.seconds_in_view, 1),
    }


def stream_json(status: StreamStatus, with_tracks: bool) -> dict[str, Any]:
    """The API's stream object: "tracks" is the list of track objects when `with_tracks`, else
    their count."""
    return {
        "id": status.id,
        "source": status.source,
        "state": status.state,
        "fps": json_number(status.fps, 2),
        "faces": int(status.faces),
        "tracks": [track_json(t) for t in status.tracks] if with_tracks else len(status.tracks),
        "dropped": int(status.dropped),
        "frames": int(status.frames),
        "latency_ms_p95": json_number(status.latency_ms_p95, 1),
        "error": status.error,
        "node": status.node,
    }


def _status(hub: Hub, stream_id: str) -> StreamStatus:
    try:
        return hub.status(stream_id)
    except KeyError:
        raise ApiError(404, f"no stream {stream_id!r}") from None


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


async def _list_streams(request: web.Request) -> web.Response:
    statuses = request.app[HUB].streams()
    return web.json_response([stream_json(status, with_tracks=False) for status in statuses])


async def _get_stream(request: web.Request) -> web.Response:
    status = _status(request.app[HUB], request.match_info["id"])
    return web.json_response(stream_json(status, with_tracks=True))


def _small_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ApiError(400, f"numbers in the body must have at most {MAX_INT_DIGITS} digits")
    return int(digits)


async def _read_json(request: web.Request, usage: str) -> object:
    """The request's JSON body, or ApiError: 408 when it is too slow to arrive, 400 when it
    is not JSON, nests too deeply or holds a huge number (413: too large, from aiohttp)."""
    body_timeout_s = request.app[TIMINGS][2]
    try:
        raw = await asyncio.wait_for(request.read(), body_timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {body_timeout_s:g} s") from None
    try:
        return json.loads(raw, parse_int=_small_int)
    except RecursionError:
        raise ApiError(400, f"the body nests too deeply: {usage}") from None
    except ValueError:  # not UTF-8, or not JSON
        raise ApiError(400, f"the body is not JSON: {usage}") from None


async def _read_add_body(request: web.Request) -> tuple[str, str | None, StreamEntry | None]:
    """The source, optional id and, with labels, the stream entry of a POST /api/streams
    body, or ApiError 400."""
    usage = (
        'send a JSON object {"source": "rtsp://... | video file | webcam index", "id": "name", '
        '"labels": {"zone": "east"}} (id and labels optional)'
    )
    body = await _read_json(request, usage)
    if not isinstance(body, dict):
        raise ApiError(400, f"the body is not a JSON object: {usage}")
    unknown = sorted(set(body) - {"source", "id", "labels"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}, expecting source, id and labels")
    source, stream_id = body.get("source"), body.get("id")
    if isinstance(source, int) and not isinstance(source, bool):
        source = str(source)  # a webcam index
    if not isinstance(source, str) or not source.strip():
        raise ApiError(400, f'"source" is missing or empty: {usage}')
    if len(source) > MAX_SOURCE_CHARS:
        raise ApiError(400, f'"source" is longer than {MAX_SOURCE_CHARS} characters')
    if stream_id is not None and not isinstance(stream_id, str):
        raise ApiError(400, f'"id" must be a string, got {json.dumps(stream_id)}')
    return source.strip(), stream_id, _labelled_entry(source.strip(), body.get("labels"))


def _labelled_entry(source: str, labels: object) -> StreamEntry | None:
    """The stream entry that places the stream by `labels` (cluster mode), None without."""
    if labels is None:
        return None
    try:
        return StreamEntry(source=source, labels=labels)  # type: ignore[arg-type]
    except ValueError:  # pydantic's ValidationError
        raise ApiError(
            400,
            '"labels" must be an object of names to values, each 1 to 63 letters, digits, '
            '"_", "." or "-" that begin and end with a letter or digit (a name may have a '
            '"domain/" prefix), as node labels are, e.g. {"zone": "east"}',
        ) from None


async def _add_stream(request: web.Request) -> web.Response:
    source, stream_id, entry = await _read_add_body(request)
    hub = request.app[HUB]
    loop = asyncio.get_running_loop()
    try:
        status = await loop.run_in_executor(
            request.app[EXECUTOR], hub.add, source, stream_id, entry
        )
    except ValueError as error:
        message = (str(error).strip().splitlines() or ["bad source or id"])[0]
        raise ApiError(409 if isinstance(error, StreamIdInUse) else 400, message) from None
    location = f"/api/streams/{quote(status.id, safe='')}"
    return web.json_response(
        stream_json(status, with_tracks=True), status=201, headers={"Location": location}
    )


async def _remove_stream(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    loop = asyncio.get_running_loop()
    try:
        # Blocks while the stream's outputs are finalized: the default executor, not the
        # frame fetchers'.
        await loop.run_in_executor(None, request.app[HUB].remove, stream_id)
    except KeyError:
        raise ApiError(404, f"no stream {stream_id!r}") from None
    return web.Response(status=204)


@dataclass(frozen=True)
class CountsQuery:
    """What /api/counts was asked for: unix seconds [start, end), one camera or None (all),
    and the period ("hour" or "day") of its rows."""

    start: float
    end: float
    camera: str | None
    by: str


def iso_utc(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC with a Z, to the second (to the millisecond when it has a
    fraction)."""
    return utc_iso(seconds, "seconds" if float(seconds).is_integer() else "milliseconds")


def parse_instant(name: str, text: str) -> float:
    """Unix seconds of query parameter `name`'s `text`: ISO 8601 (UTC when it names no zone)
    or unix seconds; ApiError 400 for anything else or a time before 1970 or after 9999."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = utc_seconds(text)
        except ValueError:
            seconds = math.nan
    if not 0 <= seconds <= LAST_UNIX_S:
        raise ApiError(
            400,
            f"{name} must be an ISO 8601 time (UTC unless it names a zone, e.g. "
            f"2024-05-01T13:00:00Z) or unix seconds from 1970, got {text[:50]!r}",
        )
    return seconds


def counts_query(query: Mapping[str, str], now: float) -> CountsQuery:
    """The CountsQuery of a /api/counts query string (a mapping of parameters; `token` is
    allowed and ignored); ApiError 400 naming the bad parameter. The range defaults to the 24 h
    before `to`, `to` to `now`."""
    unknown = sorted(set(query) - {*COUNTS_PARAMETERS, "token"})
    if unknown:
        raise ApiError(
            400, f"unknown parameter {unknown[0][:50]!r}, expecting from, to, camera and by"
        )
    end = parse_instant("to", query["to"]) if query.get("to") else now
    start = parse_instant("from", query["from"]) if query.get("from") else end - DEFAULT_COUNTS_S
    if start >= end:
        raise ApiError(400, f"from ({iso_utc(start)}) must be before to ({iso_utc(end)})")
    if end - start > MAX_COUNTS_DAYS * 86400:
        raise ApiError(
            400,
            f"the range from {iso_utc(start)} to {iso_utc(end)} is longer than "
            f"{MAX_COUNTS_DAYS} days: ask for a shorter one",
        )
    by = query.get("by") or "hour"
    if by not in COUNT_PERIODS:
        raise ApiError(400, f"by must be hour or day, got {by[:50]!r}")
    camera = query.get("camera") or None
    if camera is not None and len(camera) > MAX_CAMERA_CHARS:
        raise ApiError(400, f"camera is longer than {MAX_CAMERA_CHARS} characters")
    return CountsQuery(start, end, camera, by)


def counts_answer(query: CountsQuery, rows: list[CountRow]) -> dict[str, Any]:
    """The /api/counts answer: the range asked for, its rows as `agestream counts --json` gives
    them (stream.visits.counts_json) and their totals (every age group and gender, with
    "unknown", present even when 0)."""
    age_groups = dict.fromkeys((*PERSON_AGE_GROUPS, UNKNOWN), 0)
    genders = dict.fromkeys((*SHOWN_GENDERS, UNKNOWN), 0)
    for row in rows:
        age_groups[row.age_group] = age_groups.get(row.age_group, 0) + int(row.people)
        genders[row.gender] = genders.get(row.gender, 0) + int(row.people)
    return {
        "from": iso_utc(query.start),
        "to": iso_utc(query.end),
        "by": query.by,
        "camera": query.camera,
        "rows": counts_json(rows),
        "totals": {"people": sum(genders.values()), "age_groups": age_groups, "genders": genders},
    }


Answer = TypeVar("Answer")


def _one_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


async def _ask_store(request: web.Request, fetch: Callable[[], Answer]) -> Answer:
    """`fetch()` run off the event loop (a store query blocks, and a year of hourly rows is
    large): a ValueError (a query the hub refuses) is a 400, a StoreError (the store cannot be
    read) a 503, each with its first line."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(request.app[EXECUTOR], fetch)
    except ValueError as error:
        raise ApiError(400, _one_line(error)) from None
    except StoreError as error:
        log.warning("%s: %s", request.path[:100], _one_line(error))
        raise ApiError(503, _one_line(error)) from None


async def _query_counts(
    request: web.Request, render: Callable[[CountsQuery, list[CountRow]], Answer]
) -> tuple[CountsQuery, Answer]:
    """The request's query and its counts from the hub, rendered by `render`."""
    query = counts_query(request.query, time.time())
    hub = request.app[HUB]

    def fetch() -> Answer:
        rows = hub.counts(query.start, query.end, camera=query.camera, by=query.by)
        return render(query, rows)

    return query, await _ask_store(request, fetch)


async def _counts(request: web.Request) -> web.Response:
    def render(query: CountsQuery, rows: list[CountRow]) -> str:
        return json.dumps(counts_answer(query, rows), allow_nan=False)

    _, text = await _query_counts(request, render)
    return web.Response(text=text, content_type="application/json")


def _csv_text(_: CountsQuery, rows: list[CountRow]) -> str:
    file = io.StringIO()
    counts_csv(rows, file)
    return file.getvalue()


def _file_stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(UTC_STAMP)


async def _counts_csv(request: web.Request) -> web.Response:
    query, text = await _query_counts(request, _csv_text)
    name = f"agestream-counts-{_file_stamp(query.start)}-{_file_stamp(query.end)}.csv"
    return web.Response(
        text=text,
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


async def _cameras(request: web.Request) -> web.Response:
    return web.json_response(list(await _ask_store(request, request.app[HUB].cameras)))


async def _latest(request: web.Request, stream_id: str, after: int) -> tuple[int, bytes] | None:
    """The hub's newest frame after `after`, fetched off the event loop; KeyError if the stream
    is unknown (or was removed)."""
    loop = asyncio.get_running_loop()
    hub = request.app[HUB]
    return await loop.run_in_executor(request.app[EXECUTOR], hub.latest_jpeg, stream_id, after)


async def _jpeg(request: web.Request) -> web.Response:
    stream_id = request.match_info["id"]
    try:
        latest = await _latest(request, stream_id, -1)
    except KeyError:
        raise ApiError(404, f"no stream {stream_id!r}") from None
    if latest is None:
        raise ApiError(404, f"stream {stream_id!r} has no frame yet")
    return web.Response(body=latest[1], content_type="image/jpeg")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# States after which a stream sends no more frames.
FINISHED = ("ended", "failed")


async def _mjpeg(request: web.Request) -> web.StreamResponse:
    """Each viewer gets only the newest frame whenever there is a newer one (frames it was too
    slow for are skipped); a viewer that stalls a write for `write_timeout_s` is dropped, so
    it holds up nothing but itself. Ends when the client goes, the stream is removed or has
    finished (its last frame sent), or the server shuts down."""
    stream_id = request.match_info["id"]
    _status(request.app[HUB], stream_id)  # 404 before the multipart response starts
    poll_s, write_timeout_s, _ = request.app[TIMINGS]
    closing = request.app[CLOSING]
    response = web.StreamResponse(
        headers={"Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}"}
    )
    await response.prepare(request)
    sequence = -1
    while not closing.is_set() and not _client_gone(request):
        try:
            latest = await _latest(request, stream_id, sequence)
            finished = latest is None and _status(request.app[HUB], stream_id).state in FINISHED
        except (KeyError, ApiError):
            break  # removed
        if finished:
            break  # an ended file or a failed source sends no frame again
        if latest is None:
            await asyncio.sleep(poll_s)
            continue
        sequence, jpeg = latest
        head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
        try:
            await asyncio.wait_for(response.write(head.encode() + jpeg + b"\r\n"), write_timeout_s)
        except (TimeoutError, ConnectionError):
            log.debug("dropped a viewer of %s that stalled or went away", stream_id)
            if request.transport is not None:
                request.transport.abort()
            return response
    try:
        await asyncio.wait_for(response.write(f"--{BOUNDARY}--\r\n".encode()), write_timeout_s)
    except (TimeoutError, ConnectionError):
        pass
    return response


async def _metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(request.app[EXECUTOR], encoder, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": content_type})


class HubCollector:
    """Prometheus metrics read from `hub.metrics()` at each scrape: per-stream series labelled
    `stream`, and the estimator batcher's totals."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def describe(self) -> list[Metric]:
        return []  # names are not fixed up front; nothing is read from the hub at registration

    def collect(self) -> Iterator[Metric]:
        snapshot = self.hub.metrics()
        yield from _stream_families(snapshot.get("streams") or [])
        yield from _batcher_families(snapshot.get("batcher") or {})
        if "cluster" in snapshot:
            yield from _cluster_families(snapshot["cluster"])


def _stream_families(streams: list[dict]) -> Iterator[Metric]:
    """Per-stream series, labelled `stream` (and `node` in a cluster)."""
    on_nodes = any("node" in stream for stream in streams)
    labels = ["stream", "node"] if on_nodes else ["stream"]
    count = GaugeMetricFamily("agestream_streams", "Streams being served")
    count.add_metric([], len(streams))
    frames = CounterMetricFamily("agestream_stream_frames", "Frames processed", labels=labels)
    dropped = CounterMetricFamily(
        "agestream_stream_dropped_frames", "Frames a live source dropped", labels=labels
    )
    fps = GaugeMetricFamily("agestream_stream_fps", "Frames processed per second", labels=labels)
    faces = CounterMetricFamily("agestream_stream_faces", "Faces detected so far", labels=labels)
    latency = GaugeMetricFamily(
        "agestream_stream_latency_p95_seconds",
        "Capture to annotated frame, 95th percentile over the last frames",
        labels=labels,
    )
    state = GaugeMetricFamily(
        "agestream_stream_state", "1 for the stream's current state", labels=[*labels, "state"]
    )
    for stream in streams:
        name = [str(stream["id"])] + ([str(stream.get("node"))] if on_nodes else [])
        frames.add_metric(name, stream.get("frames") or 0)
        dropped.add_metric(name, stream.get("dropped") or 0)
        fps.add_metric(name, json_number(stream.get("fps"), 3) or 0.0)
        faces.add_metric(name, stream.get("faces") or 0)
        if json_number(stream.get("latency_ms_p95"), 3) is not None:
            latency.add_metric(name, stream["latency_ms_p95"] / 1000)
        current = stream.get("state")
        for each in STATES + (() if current in STATES or current is None else (current,)):
            state.add_metric(name + [each], 1.0 if each == current else 0.0)
    yield from (count, frames, dropped, fps, faces, latency, state)


def _batcher_families(batcher: dict) -> Iterator[Metric]:
    calls = CounterMetricFamily("agestream_batcher_calls", "Batched estimator calls")
    calls.add_metric([], batcher.get("calls") or 0)
    faces = CounterMetricFamily("agestream_batcher_faces", "Faces estimated in batched calls")
    faces.add_metric([], batcher.get("faces") or 0)
    mean = GaugeMetricFamily("agestream_batcher_mean_batch", "Mean faces per batched call")
    mean.add_metric([], json_number(batcher.get("mean_batch"), 3) or 0.0)
    yield from (calls, faces, mean)


def _cluster_families(cluster: dict) -> Iterator[Metric]:
    """Nodes ready, streams moved off nodes that died, and each node's calls to the
    estimator service."""
    nodes = GaugeMetricFamily("agestream_cluster_nodes", "Worker nodes ready to serve streams")
    nodes.add_metric([], cluster.get("nodes") or 0)
    moved = CounterMetricFamily(
        "agestream_cluster_reassignments", "Streams restarted on another node after theirs died"
    )
    moved.add_metric([], cluster.get("reassignments") or 0)
    yield from (nodes, moved)
    services = cluster.get("service") or []
    if not services:
        return
    calls = CounterMetricFamily(
        "agestream_estimator_service_calls",
        "Batches sent to the estimator service",
        labels=["node"],
    )
    fallbacks = CounterMetricFamily(
        "agestream_estimator_service_fallbacks",
        "Batches the node's own model estimated: the service did not answer in time",
        labels=["node"],
    )
    latency = GaugeMetricFamily(
        "agestream_estimator_service_latency_p95_seconds",
        "Estimator service call, 95th percentile over the last calls",
        labels=["node"],
    )
    for service in services:
        node = [str(service.get("node"))]
        calls.add_metric(node, service.get("calls") or 0)
        fallbacks.add_metric(node, service.get("fallbacks") or 0)
        if json_number(service.get("latency_p95_ms"), 3) is not None:
            latency.add_metric(node, service["latency_p95_ms"] / 1000)
    yield from (calls, fallbacks, latency)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def _serve(
    app: web.Application,
    address: tuple[str, int],
    stop: threading.Event,
    on_ready: Callable[[int], None] | None,
    limits: tuple[int, float],
) -> None:
    max_connections, header_timeout_s = limits
    # No access log: a ?token= in a URL must not land in logs. aiohttp's keep-alive timer also
    # closes a connection whose first request's headers are not in within its timeout.
    runner = web.AppRunner(
        app, access_log=None, shutdown_timeout=2.0, keepalive_timeout=header_timeout_s
    )
    await runner.setup()
    assert runner.server is not None  # set up
    limiter = RateLimiter()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(limiter.loop_errors)
    aiohttp_log = logging.getLogger("aiohttp.server")  # a traceback per malformed request
    aiohttp_log.addFilter(limiter.filter)
    listener = None
    try:
        cap = ConnectionCap(runner.server, max_connections, app[BUSY], limiter)
        listener = await loop.create_server(cap, *address)
        bound = listener.sockets[0].getsockname()[1]
        log.info("serving the live page on http://%s:%d/", _url_host(address[0]), bound)
        if on_ready is not None:
            on_ready(bound)
        while not stop.is_set():
            await asyncio.sleep(0.1)
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        aiohttp_log.removeFilter(limiter.filter)


def serve_forever(
    hub: Hub,
    host: str,
    port: int,
    token: str | None,
    stop: threading.Event,
    on_ready: Callable[[int], None] | None = None,
    *,
    allowed_hosts: tuple[str, ...] = (),
    max_connections: int = MAX_CONNECTIONS,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    **app_options: float,
) -> None:
    """Serve `create_app(hub, token, host=host, allowed_hosts=..., **app_options)` on
    host:port until `stop` is set (port 0: any free port; `on_ready` gets the bound port once
    it listens), with at most `max_connections` open and `header_timeout_s` for a request's
    headers. ConfigError (check_exposure) for a non-loopback host without a token; OSError
    when the address cannot be bound."""
    check_exposure(host, token)
    app = create_app(hub, token, host=host, allowed_hosts=allowed_hosts, **app_options)
    limits = (max_connections, header_timeout_s)
    asyncio.run(_serve(app, (host, port), stop, on_ready, limits))
