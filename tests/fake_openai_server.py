"""A tiny OpenAI-compatible chat-completions server for the evaluation tests.

It runs on 127.0.0.1 on a free port inside a daemon thread, so the real ``openai`` client
(and the real retry / resume code in ``evaluation.api``) talk to it over HTTP exactly as they
would talk to OpenAI, vLLM or Ollama. What each request gets back is decided by a
``responder`` the test supplies; every request is recorded so tests can count attempts
server-side.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    """What the server sends back for one request."""

    status: int = 200
    content: str | None = None  # assistant text when status == 200
    body: dict[str, Any] | None = None  # explicit JSON body (overrides content)
    headers: dict[str, str] = field(default_factory=dict)
    prompt_tokens: int = 100
    completion_tokens: int = 20
    finish_reason: str = "stop"  # "length": the answer was cut at the token budget
    hang: threading.Event | None = None  # wait on this before answering (simulates a slow call)
    drop: bool = False  # close the connection without any answer


@dataclass
class Recorded:
    """One request the server received."""

    path: str
    authorization: str
    body: dict[str, Any]
    status: int | None = None  # what was answered (None: nothing was sent)


Responder = Callable[[dict[str, Any]], Reply]


def error_reply(status: int, message: str = "scripted failure", **headers: str) -> Reply:
    """An OpenAI-style error body with the given HTTP status."""
    return Reply(
        status=status,
        body={"error": {"message": message, "type": "test_error", "code": str(status)}},
        headers=dict(headers),
    )


def _completion_body(reply: Reply, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-test-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        },
    }


class FakeOpenAIServer:
    """Context manager: ``with FakeOpenAIServer(responder) as srv: srv.base_url``."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0  # most chat requests being handled at the same moment
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest output quiet
                pass

            def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # /v1/models, for clients that probe it
                self._send_json(200, {"object": "list", "data": []}, {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {}
                rec = Recorded(self.path, self.headers.get("Authorization", ""), body)
                with owner.lock:
                    owner.requests.append(rec)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    rec.status = 404
                    self._send_json(404, {"error": {"message": "no such route"}}, {})
                    return
                with owner.lock:
                    owner.inflight += 1
                    owner.max_inflight = max(owner.max_inflight, owner.inflight)
                try:
                    reply = owner.responder(body)
                    if reply.hang is not None:
                        reply.hang.wait(30)
                    if reply.drop:
                        self.close_connection = True
                        return
                    payload = reply.body if reply.body is not None else _completion_body(
                        reply, str(body.get("model", "fake"))
                    )
                    try:
                        self._send_json(reply.status, payload, reply.headers)
                    except OSError:  # client went away while we waited
                        return
                    rec.status = reply.status
                finally:
                    with owner.lock:
                        owner.inflight -= 1

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def snapshot(self) -> list[Recorded]:
        with self.lock:
            return list(self.requests)
