"""An HTTP reward server: registered scorers behind ``POST /v1/score`` with request batching (docs/serving.md).

Standard library only: :class:`http.server.ThreadingHTTPServer` answers each connection in its own thread; a
handler decodes the body (:mod:`visalign.scorers.wire`: PNG-in-JSON or safetensors, never pickle) and hands it to
its scorer's :class:`BatchQueue`. One worker thread per scorer takes the waiting requests (up to ``max_batch``
samples, waiting at most ``max_wait_s`` for more after the first), scores them as one batch and hands every
request its slice. Concurrent clients therefore share one forward pass, which is what keeps a GPU scorer busy.

Refusals are 4xx and never stop the server: 400 malformed body, 401 missing or wrong bearer token, 404 unknown
path or scorer, 411 no Content-Length, 413 body over ``max_body_bytes`` (refused before it is read), 415 a
content type other than the two of the schema (pickle included). A scorer that raises answers 500 to the requests
of that batch (the client retries 5xx), and the next batch is scored as usual.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from visalign.scorers import ScoreBatch, Scorer
from visalign.scorers.wire import CONTENT_TYPES, ScoreAnswer, ScoreRequest, WireError, decode_request, encode_answer

logger = logging.getLogger(__name__)

SCORE_PATH = "/v1/score"
HEALTH_PATH = "/health"
DRAIN_LIMIT = 1 << 28  # refused bodies up to 256 MiB are read and dropped; a larger one gets its connection closed


@dataclass
class ServerStats:
    """Counters shown by ``GET /health`` (and read by tests): requests answered, batches scored, the largest batch
    in requests and in samples, and refusals by HTTP status."""

    requests: int = 0
    batches: int = 0
    max_batch_requests: int = 0
    max_batch_samples: int = 0
    refused: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "batches": self.batches,
                    "max_batch_requests": self.max_batch_requests, "max_batch_samples": self.max_batch_samples,
                    "refused": {str(k): v for k, v in sorted(self.refused.items())}}


class BatchQueue:
    """Concurrent requests for one scorer → batches of at most ``max_batch`` samples (one worker thread).

    Requests are batched only with requests of the same media shape and the same presence of metadata; the
    others wait for the next batch.
    """

    def __init__(self, scorer: Scorer, stats: ServerStats, *, max_batch: int, max_wait_s: float) -> None:
        self.scorer = scorer
        self.stats = stats
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue: queue.Queue[tuple[ScoreRequest, Future] | None] = queue.Queue()
        self.held: list[tuple[ScoreRequest, Future]] = []
        self.thread = threading.Thread(target=self._work, name=f"visalign-serve-{scorer.id}", daemon=True)
        self.thread.start()

    def submit(self, request: ScoreRequest) -> Future:
        future: Future = Future()
        self.queue.put((request, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)

    def _next(self, timeout: float | None) -> tuple[ScoreRequest, Future] | None:
        if self.held:
            return self.held.pop(0)
        return self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()

    def _work(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = [first]
            key = _batch_key(first[0])
            samples = len(first[0].prompts)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while samples < self.max_batch:
                try:
                    item = self._next(deadline - time.monotonic())
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if _batch_key(item[0]) != key or samples + len(item[0].prompts) > self.max_batch:
                    self.held.append(item)
                    break
                batch.append(item)
                samples += len(item[0].prompts)
            self._score(batch, samples)
            if stop:
                return

    def _score(self, batch: list[tuple[ScoreRequest, Future]], samples: int) -> None:
        requests = [r for r, _ in batch]
        metadata = ([m for r in requests for m in r.metadata] if requests[0].metadata is not None else None)
        joined = ScoreBatch(prompts=[p for r in requests for p in r.prompts],
                            media=torch.cat([r.media for r in requests]), metadata=metadata)
        try:
            out = self.scorer(joined)
        except Exception as err:  # the scorer's failure is this batch's answer, not the server's end
            logger.warning("scorer %s failed on a batch of %d samples: %s: %s", self.scorer.id, samples,
                           type(err).__name__, err)
            for _, future in batch:
                future.set_exception(err)
            return
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.max_batch_requests = max(self.stats.max_batch_requests, len(batch))
            self.stats.max_batch_samples = max(self.stats.max_batch_samples, samples)
        logger.info("scored a batch of %d samples from %d requests with %s", samples, len(batch), self.scorer.id)
        extras = {k: v for k, v in out.extras.items() if v.ndim == 1 and v.shape[0] == samples}
        offset = 0
        info = {"requests": len(batch), "samples": samples}
        for request, future in batch:
            n = len(request.prompts)
            part = slice(offset, offset + n)
            future.set_result(ScoreAnswer(scorer=self.scorer.id, reward=out.reward[part], raw=out.raw[part],
                                          extras={k: v[part] for k, v in extras.items()}, batch=info))
            offset += n


def _batch_key(request: ScoreRequest) -> tuple[Any, ...]:
    return tuple(request.media.shape[1:]), request.metadata is not None


@dataclass
class ServeConfig:
    """How the server listens and batches.

    Attributes:
        host: bind address; 127.0.0.1 (loopback) unless the server is meant to be reached from other machines.
        port: TCP port (0 = any free one; :attr:`RewardServer.port` says which).
        token: bearer token every request must carry (``Authorization: Bearer …``); None = no check.
        max_body_bytes: larger bodies are refused with 413 before they are read.
        max_batch: samples per scored batch; max_wait_s: how long the first request of a batch waits for more.
        timeout_s: how long a request waits for its batch to be scored before it is answered 503.
    """

    host: str = "127.0.0.1"
    port: int = 8100
    token: str | None = None
    max_body_bytes: int = 64 << 20
    max_batch: int = 64
    max_wait_s: float = 0.01
    timeout_s: float = 300.0


class RewardServer:
    """Serves ``scorers`` (id → :class:`Scorer`) until :meth:`stop`; :meth:`start` returns at once (a daemon
    thread), :meth:`serve_forever` blocks (the CLI)."""

    def __init__(self, scorers: dict[str, Scorer], config: ServeConfig) -> None:
        if not scorers:
            raise ValueError("visalign serve needs at least one scorer: --scorer ID[,ID...].")
        if config.max_batch < 1 or config.max_body_bytes < 1 or config.max_wait_s < 0:
            raise ValueError("max_batch and max_body_bytes must be >= 1 and max_wait_s >= 0.")
        self.config = config
        self.stats = ServerStats()
        self.queues = {name: BatchQueue(s, self.stats, max_batch=config.max_batch, max_wait_s=config.max_wait_s)
                       for name, s in scorers.items()}
        self.httpd = ThreadingHTTPServer((config.host, config.port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> RewardServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="visalign-serve", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.close()

    def close(self) -> None:
        self.httpd.server_close()
        for q in self.queues.values():
            q.close()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "scorers": sorted(self.queues), **self.stats.as_dict()}


def _handler(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "visalign-serve"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            logger.debug("%s " + format, self.client_address[0], *args)

        def _send(self, status: int, body: bytes) -> None:
            if status >= 400:
                with server.stats.lock:
                    server.stats.refused[status] = server.stats.refused.get(status, 0) + 1
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode("utf-8"))

        def _authorised(self) -> bool:
            token = server.config.token
            if token is None:
                return True
            given = self.headers.get("Authorization", "")
            if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return True
            self._discard_body()
            self._error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path != HEALTH_PATH:
                self._error(404, f"unknown path {self.path!r}; GET {HEALTH_PATH} or POST {SCORE_PATH}")
                return
            if self._authorised():
                self._send(200, json.dumps(server.health()).encode("utf-8"))

        def do_POST(self) -> None:  # noqa: N802
            if self.path != SCORE_PATH:
                self.close_connection = True
                self._error(404, f"unknown path {self.path!r}; POST {SCORE_PATH}")
                return
            if not self._authorised():
                return
            body = self._read_body()
            if body is None:
                return
            try:
                request = decode_request(body, self.headers.get("Content-Type", ""))
            except WireError as err:
                kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
                self._error(400 if kind in CONTENT_TYPES else 415, str(err))
                return
            name = request.scorer or (next(iter(server.queues)) if len(server.queues) == 1 else None)
            if name not in server.queues:
                self._error(404 if name else 400, f"scorer {name!r} is not served here; served: "
                            f"{sorted(server.queues)} (name one with 'scorer')")
                return
            future = server.queues[name].submit(request)
            try:
                answer = future.result(timeout=server.config.timeout_s)
            except TimeoutError:
                self._error(503, f"scoring did not finish within {server.config.timeout_s:g} s")
                return
            except Exception as err:  # the scorer raised on this batch
                self._error(500, f"scorer {name!r} failed: {type(err).__name__}: {err}")
                return
            with server.stats.lock:
                server.stats.requests += 1
            self._send(200, encode_answer(answer))

        def _discard_body(self) -> None:
            """Read and drop a refused body (up to :data:`DRAIN_LIMIT` bytes, then the connection is closed):
            closing a socket with unread data resets it, and the client would see a reset instead of the 4xx."""
            self.close_connection = True
            length = self.headers.get("Content-Length", "")
            left = min(int(length), DRAIN_LIMIT) if length.strip().isdigit() else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

        def _read_body(self) -> bytes | None:
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                self.close_connection = True
                self._error(411, "a Content-Length header is required")
                return None
            size = int(length)
            if size > server.config.max_body_bytes:
                self._discard_body()  # never kept: read in chunks and dropped, so the client sees the answer
                self._error(413, f"body of {size} bytes is over the limit of {server.config.max_body_bytes}")
                return None
            return self.rfile.read(size)

    return Handler
