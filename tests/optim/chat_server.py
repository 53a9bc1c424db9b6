"""A real HTTP server speaking the OpenAI chat-completions protocol (``POST /v1/chat/completions``, ``GET
/v1/models``), in a daemon thread, answering from a Python responder: the tests of optimizer ``llm`` run through the
ordinary ``openai`` client against it."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What the server answers: HTTP ``status`` (an error body unless 200), the assistant ``content``, and a
    ``delay`` in seconds before answering (to provoke client timeouts)."""

    content: str = ""
    status: int = 200
    delay: float = 0.0


class ChatServer:
    """``ChatServer(responder)``: ``responder(body: dict) -> Reply`` gets each chat request's JSON body.

    Attributes:
        requests: the chat request bodies received, in order.
        base_url: ``http://127.0.0.1:PORT/v1``.
    """

    def __init__(self, responder, *, api_key: str | None = None, models: tuple[str, ...] = ("scripted",)):
        self.responder = responder
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def _authorized(self) -> bool:
                if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                    return True
                self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                return False

            def do_GET(self):  # noqa: N802
                if not self._authorized():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                                 "owned_by": "tests"} for m in models]})
                else:
                    self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not self._authorized():
                    return
                with server._lock:
                    server.requests.append(body)
                reply = server.responder(body)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.status != 200:
                    self._send(reply.status, {"error": {"message": "scripted failure", "type": "server_error"}})
                    return
                self._send(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                    "model": body.get("model", ""),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply.content}}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- responders ------------------------------------------------------------------------------------------
def shown(body: dict) -> tuple[int, list[list[float]], list[int]]:
    """(generation, solutions, fitness) read back from an ``llm`` prompt (solutions listed worst to best)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    xs, fs = [], []
    for line in user.splitlines():
        m = re.fullmatch(r"x: \[(.*)\] f: (-?\d+)", line)
        if m:
            xs.append([float(v) for v in m.group(1).split(", ")])
            fs.append(int(m.group(2)))
    return int(re.search(r"Generation (\d+):", user).group(1)), xs, fs


def toward(target: float, step: float = 0.5):
    """Deterministic responder: the best shown solution moved ``step`` of the way toward ``target`` (per gene)."""

    def respond(body: dict) -> Reply:
        _, xs, _ = shown(body)
        best = xs[-1]
        return Reply(json.dumps({"mean": [b + step * (target - b) for b in best]}))

    return respond


_SHARED: list[ChatServer] = []


def shared_server() -> ChatServer:
    """One server for the whole test session (the optimizer contract tests run ``llm`` against it)."""
    if not _SHARED:
        _SHARED.append(ChatServer(toward(0.0)))
    return _SHARED[0]


def llm_options(server: ChatServer, **kw) -> dict:
    """Options of optimizer ``llm`` pointed at ``server`` (no key, no backoff sleeps)."""
    return {"model": "scripted", "base_url": server.base_url, "api_key_env": None, "backoff": 0.0, **kw}
