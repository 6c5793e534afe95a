"""A chat-completions endpoint on 127.0.0.1 for judge and rephraser tests: a marker ``<CASE>`` in the prompt
picks the reply, and every request is counted with its Authorization header."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# reply(server, case, count) -> (HTTP status, content); content None sends an error body naming the key sent
Reply = Callable[["FakeChatServer", str, int], tuple[int, str | None]]


class FakeChatServer:
    def __init__(
        self, cases: tuple[str, ...], reply: Reply, default: str, url_suffix: str = "/v1", port: int = 0
    ) -> None:
        self.cases, self._reply, self.default = cases, reply, default
        self.counts: Counter[str] = Counter()
        self.auth: list[str | None] = []
        self.prompts: dict[str, str] = {}
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())  # port 0: any free one
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{url_suffix}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                case = next((c for c in fake.cases if f"<{c}>" in prompt), fake.default)
                with fake.lock:
                    fake.counts[case] += 1
                    fake.auth.append(self.headers.get("Authorization"))
                    fake.prompts[case] = prompt
                    fake.paths.append(self.path)
                    count = fake.counts[case]
                status, content = fake._reply(fake, case, count)
                if content is None:
                    payload = json.dumps({"error": f"boom, you sent {self.headers.get('Authorization')}"})
                else:
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except OSError:  # the client gave up (timeout cases)
                    pass

        return Handler


def closed_port() -> int:
    """A loopback port nothing listens on (a connection to it is refused), for a server that is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
