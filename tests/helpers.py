"""Helpers that several test modules import: HTTP servers on loopback that stand in for OpenAI-compatible
endpoints (tests/test_openai_backend.py, tests/test_judge.py), and the digests of a folder's files (what was
set aside or refused must be byte-identical)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def files_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its path relative to it."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing (the test output stays readable) and answers in one call."""

    def log_message(self, *args):
        pass

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers["Content-Length"]))

    def reply(self, status: int, payload: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def reply_json(self, payload: bytes) -> None:
        """200 with an already encoded JSON body."""
        self.reply(200, payload, {"Content-Type": "application/json"})

    def reply_chat(self, text: str) -> None:
        """200 with a chat-completions answer of one choice."""
        choice = {"message": {"role": "assistant", "content": text}}
        self.reply_json(json.dumps({"choices": [choice]}).encode())


def serve_on_loopback(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded server on a free port of 127.0.0.1, serving in a daemon thread until shut down."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd
