"""A tiny fake VLM server speaking the OpenAI chat-completions protocol with logprobs, on 127.0.0.1 (port 0).

Real sockets and real HTTP (``http.server`` in a daemon thread), so ``RemoteYesScorer`` is exercised end to end
offline. The "model" is deterministic: P(yes) is a function of the request's image bytes and question text
(:func:`fake_p_yes`), so a test can compute the exact score it expects. Failure modes for the retry tests are
switched on per server: delays (timeouts), HTTP 500s and malformed JSON for the first N requests, and answers
without any yes token.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def fake_p_yes(content: list[dict[str, Any]]) -> float:
    """The fake model's P(yes) for one message content (images then question): in [0.05, 0.95], from a hash."""
    digest = hashlib.sha256()
    for part in content:
        digest.update(part["image_url"]["url"].encode() if part["type"] == "image_url" else part["text"].encode())
    return 0.05 + 0.9 * int.from_bytes(digest.digest()[:8], "big") / 2**64


def fake_alternatives(p_yes: float) -> list[tuple[str, float]]:
    """Top alternatives of the first token: "Yes"/" yes" share 90 % of P(yes), "No"/"no" 90 % of P(no).

    Summed and renormalised, the yes variants give back exactly ``p_yes``; "Maybe" holds the remaining 10 %.
    """
    return sorted([("Yes", math.log(0.8 * p_yes)), (" yes", math.log(0.1 * p_yes)),
                   ("No", math.log(0.8 * (1 - p_yes))), ("no", math.log(0.1 * (1 - p_yes))),
                   ("Maybe", math.log(0.1))], key=lambda t: -t[1])


@dataclass
class FakeBehaviour:
    """How the fake server misbehaves (all off by default)."""

    delay_s: float = 0.0  # sleep before answering each request (client timeouts)
    fail_first: int = 0  # answer HTTP 500 to this many requests first
    malformed_first: int = 0  # then answer this many with broken JSON
    always_malformed: bool = False
    no_yes_token: bool = False  # leave every yes variant out of top_logprobs
    hold_s: float = 0.0  # keep each request in flight this long (to observe concurrency)


@dataclass
class FakeYesServer:
    """Start with :meth:`start`; ``base_url`` is then ``http://127.0.0.1:<port>/v1``. Stop with :meth:`stop`."""

    behaviour: FakeBehaviour = field(default_factory=FakeBehaviour)
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FakeYesServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                try:
                    owner._handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping in a delay
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self._lock:
            self.requests += 1
            number = self.requests
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.bodies.append(body)
        released = False

        def release() -> None:  # leave the in-flight count before the reply goes out: once the client has the
            nonlocal released   # reply it may send its next request, which must not see this one as in flight
            if not released:
                released = True
                with self._lock:
                    self.in_flight -= 1

        try:
            b = self.behaviour
            if b.delay_s:
                self._stopping.wait(b.delay_s)
            if b.hold_s:
                time.sleep(b.hold_s)
            if handler.path != "/v1/chat/completions":
                status, payload = 404, b'{"error": "not found"}'
            elif number <= b.fail_first:
                status, payload = 500, b'{"error": "internal error (fake)"}'
            elif b.always_malformed or number <= b.fail_first + b.malformed_first:
                status, payload = 200, b'{"choices": [{"logprobs": '
            else:
                status, payload = 200, json.dumps(self.answer(body)).encode()
            release()
            self._send(handler, status, payload)
        finally:
            release()

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat-completions response whose first token's top logprobs encode :func:`fake_p_yes`."""
        alternatives = fake_alternatives(fake_p_yes(body["messages"][-1]["content"]))
        if self.behaviour.no_yes_token:
            alternatives = [a for a in alternatives if a[0].strip().lower() != "yes"]
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives]
        top = top[: int(body.get("top_logprobs", 20))]
        return {"id": "fake", "object": "chat.completion", "model": body.get("model", ""),
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": top[0]["token"]},
                             "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}]}


_SHARED: FakeYesServer | None = None


def build_tiny_remote(card: Any, folder: Path) -> dict[str, Any]:
    """Tiny-builder for ``RemoteYesScorer`` cards: point them at one shared, well-behaved fake server."""
    global _SHARED
    if _SHARED is None:
        _SHARED = FakeYesServer().start()
    return {"weights": {"base_url": _SHARED.base_url, "model": "fake-vlm"}, "params": {"timeout_s": 10.0}}
