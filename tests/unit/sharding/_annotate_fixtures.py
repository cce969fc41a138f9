"""Helpers of the annotate tests: small images, answers and result lines in the
OpenAI Batch output format, and a small OpenAI-compatible chat server on
127.0.0.1 that answers from a table (with scripted 429s, 500s and silences)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from sharding.schema import AUTHENTICITY_ATTRIBUTES, FORGERY_ATTRIBUTES


def write_images(folder: Path, n: int, fmt: str = "PNG", ext: str = "png", size: tuple[int, int] = (24, 16),
                 start: int = 0) -> list[Path]:
    """n distinct small images named img<i>.<ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        buf = io.BytesIO()
        Image.new("RGB", size, (i * 37 % 256, i * 11 % 256, 90)).save(buf, fmt)
        p = folder / f"img{i}.{ext}"
        p.write_bytes(buf.getvalue())
        out.append(p)
    return out


def answer(label: int, caption: str | None = "A plain coloured rectangle.", **texts) -> str:
    """A JSON answer in the prompt's form; texts override attribute texts (None = null)."""
    names = FORGERY_ATTRIBUTES if label else AUTHENTICITY_ATTRIBUTES
    attrs = {n: f"Evidence for {n.lower()}." for n in names}
    attrs.update({k.replace("_", " "): v for k, v in texts.items()})
    obj = {"Answer": "The image is fake." if label else "The image is real.",
           "Forgery Attributes" if label else "Attributes": attrs}
    if caption is not None:
        obj["Caption"] = caption
    return json.dumps(obj)


def result_line(cid: str, content: str | None = None, status: int = 200, error: dict | None = None,
                usage: dict | None = None) -> str:
    """One line of a Batch output (or error) file."""
    if error is not None:
        return json.dumps({"id": f"batch_req_{cid}", "custom_id": cid, "response": None, "error": error})
    body = ({"id": "chatcmpl-1", "object": "chat.completion",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                          "finish_reason": "stop"}],
             "usage": usage or {"prompt_tokens": 300, "completion_tokens": 100, "total_tokens": 400}}
            if status == 200 else {"error": {"message": "bad request", "type": "invalid_request_error"}})
    return json.dumps({"id": f"batch_req_{cid}", "custom_id": cid,
                       "response": {"status_code": status, "request_id": "req_1", "body": body}, "error": None})


def image_identity(body: dict) -> str:
    """sha256 of the image bytes in a chat request body (what the server's table is keyed by)."""
    for part in body["messages"][0]["content"]:
        if part.get("type") == "image_url":
            data = part["image_url"]["url"].split(",", 1)[1]
            return hashlib.sha256(base64.b64decode(data)).hexdigest()
    raise ValueError("no image in the request")


class ChatServer:
    """An OpenAI-compatible /v1/chat/completions server on 127.0.0.1.

    table: image sha256 -> answer content. faults: image sha256 -> list of
    what the first requests for that image get ("429", "500", "hang"), in
    order; later requests are answered. Every request is logged as
    (image sha256, what it got)."""

    def __init__(self, table: dict[str, str], faults: dict[str, list[str]] | None = None, delay_s: float = 0.0,
                 hang_s: float = 5.0):
        self.table, self.faults, self.delay_s, self.hang_s = table, dict(faults or {}), delay_s, hang_s
        self.log: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                ident = image_identity(body)
                with server.lock:
                    queue = server.faults.get(ident, [])
                    what = queue.pop(0) if queue else "200"
                    server.log.append((ident, what))
                    server.auth.append(self.headers.get("Authorization"))
                if what == "hang":
                    time.sleep(server.hang_s)
                    self.close_connection = True
                    return
                if what == "429":
                    self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                    return
                if what == "500":
                    self._send(500, {"error": {"message": "server error"}})
                    return
                time.sleep(server.delay_s)
                content = server.table.get(ident)
                if content is None:
                    self._send(400, {"error": {"message": "unknown image"}})
                    return
                self._send(200, {"id": "chatcmpl-x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
