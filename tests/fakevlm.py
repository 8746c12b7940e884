"""A fake OpenAI-protocol VLM for tests: an HTTP server on 127.0.0.1 recording requests, answering from a script.

Fixtures: `fake_vlm` (a running FakeVlm) and `dead_vlm_url` (a base URL whose port refuses connections).
"""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Union

import pytest

from persona.services.caption.settings import CaptionSettings

DEFAULT_ANSWER = "a photo of a dog lying on a green lawn next to a red rubber ball"
MODEL = "fake-vlm"


@dataclass(frozen=True)
class Reply:
    """One scripted answer: text with HTTP 200, an error status, or a dropped connection."""

    text: str = DEFAULT_ANSWER
    status: int = 200
    drop: bool = False  # close the connection without answering (the client sees a connection error)


Answer = Union[str, Reply]
Responder = Callable[[dict], Answer]


class FakeVlm:
    """Serves POST /v1/chat/completions; `requests` holds every request body received, in order."""

    def __init__(self):
        self.requests: list[dict] = []
        self.responder: Responder = lambda body: DEFAULT_ANSWER
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-vlm", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *answers: Answer | Responder) -> None:
        """Answers the next requests in this order, repeating the last; an entry may be a responder."""
        queue, lock = list(answers), threading.Lock()

        def respond(body: dict) -> Answer:
            with lock:  # requests arrive on several server threads
                answer = queue.pop(0) if len(queue) > 1 else queue[0]
            return answer(body) if callable(answer) else answer

        self.responder = respond

    def settings(self, **overrides) -> CaptionSettings:
        """CaptionSettings pointing at this server, with no network retries so failures are quick."""
        return replace(CaptionSettings(vlm_base_url=self.base_url, vlm_model=MODEL, vlm_api_key="test-key",
                                       timeout_s=30, network_retries=0, max_attempts=3, concurrency=2),
                       **overrides)

    def answer(self, body: dict) -> Reply:
        with self._lock:
            self.requests.append(body)
        answer = self.responder(body)
        return answer if isinstance(answer, Reply) else Reply(text=answer)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(fake: FakeVlm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            try:
                reply = fake.answer(body)
            except Exception as e:  # a broken test responder: show it to the client, don't hang
                return self._send(500, {"error": {"message": f"fake responder failed: {e!r}", "type": "server"}})
            if reply.drop:
                self.close_connection = True
                return
            if reply.status != 200:
                return self._send(reply.status, {"error": {"message": reply.text, "type": "fake_error",
                                                           "code": str(reply.status)}})
            self._send(200, {
                "id": f"chatcmpl-fake-{len(fake.requests)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", MODEL),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": reply.text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first (the timeout tests): nobody is left to answer

        def log_message(self, format, *args):  # keep test output clean
            pass

    return Handler


def texts(body: dict) -> list[str]:
    """The text of every message of a request, in order (text parts of multi-part messages joined)."""
    out = []
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.append(" ".join(part["text"] for part in content if part["type"] == "text"))
    return out


def image_bytes(body: dict) -> list[bytes]:
    """The decoded images of a request's `image_url` parts (data URLs)."""
    images = []
    for message in body["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image_url":
                header, _, data = part["image_url"]["url"].partition(",")
                assert header.startswith("data:image/") and header.endswith(";base64"), header
                images.append(base64.b64decode(data))
    return images


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 whose port was just freed, so connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def fake_vlm():
    """A running FakeVlm: `.base_url`, `.requests`, `.script(...)`, `.responder`, `.settings(**overrides)`."""
    fake = FakeVlm()
    yield fake
    fake.close()


@pytest.fixture
def dead_vlm_url() -> str:
    return closed_port_url()
