"""A tiny HTTP proxy on loopback in front of the RGW lab that misbehaves on purpose.

Every request is forwarded unchanged (the SigV4 signature covers the Host header, which
is passed through, so the gateway accepts it) unless a bounded rule says otherwise:

* ``throttle(n, status, code)``: the next ``n`` requests get ``status`` with an S3 error
  body (``503 SlowDown``, ``429``, ``500 InternalError``) without reaching the gateway;
* ``delay(n, seconds)``: the next ``n`` requests are answered ``seconds`` late;
* ``fail_matching(n, text)``: the next ``n`` requests whose path holds ``text`` (say
  ``partNumber=``) get ``500 InternalError``;
* ``drop_after_forward(n, method)``: the next ``n`` requests of ``method`` reach the
  gateway, which applies them, and then the connection is closed without an answer
  (a response lost on the way back).

Listens on 127.0.0.1 only; every rule fires a bounded number of times.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade",
        "expect"}


@dataclass
class Rules:
    lock: threading.Lock = field(default_factory=threading.Lock)
    throttle_left: int = 0
    throttle_status: int = 503
    throttle_code: str = "SlowDown"
    delay_left: int = 0
    delay_s: float = 0.0
    drop_left: int = 0
    drop_method: str = "PUT"
    match_left: int = 0
    match_text: str = ""
    seen: int = 0
    throttled: int = 0
    delayed: int = 0
    dropped: int = 0

    def take(self, method: str, path: str) -> tuple[str, float]:
        with self.lock:
            self.seen += 1
            if self.match_left > 0 and self.match_text in path:
                self.match_left -= 1
                self.throttled += 1
                return "fail", 0.0
            if self.throttle_left > 0:
                self.throttle_left -= 1
                self.throttled += 1
                return "throttle", 0.0
            if self.drop_left > 0 and method == self.drop_method:
                self.drop_left -= 1
                self.dropped += 1
                return "drop", 0.0
            if self.delay_left > 0:
                self.delay_left -= 1
                self.delayed += 1
                return "delay", self.delay_s
            return "forward", 0.0


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.up_host = u.hostname or "127.0.0.1"
        self.up_port = u.port or 80
        self.rules = Rules()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action, secs = proxy.rules.take(self.command, self.path)
                if action in ("throttle", "fail"):
                    r = proxy.rules
                    status, code = (
                        (r.throttle_status, r.throttle_code)
                        if action == "throttle"
                        else (500, "InternalError")
                    )
                    err = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}'
                        "</Code><Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                if secs:
                    time.sleep(secs)
                conn = http.client.HTTPConnection(proxy.up_host, proxy.up_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if action == "drop":
                    self.close_connection = True
                    return  # the gateway applied it; the answer is lost
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # its Content-Length is the object's size
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def throttle(self, n: int, status: int = 503, code: str = "SlowDown") -> None:
        with self.rules.lock:
            self.rules.throttle_left = n
            self.rules.throttle_status = status
            self.rules.throttle_code = code

    def delay(self, n: int, seconds: float) -> None:
        with self.rules.lock:
            self.rules.delay_left = n
            self.rules.delay_s = seconds

    def fail_matching(self, n: int, text: str) -> None:
        with self.rules.lock:
            self.rules.match_left = n
            self.rules.match_text = text

    def drop_after_forward(self, n: int, method: str = "PUT") -> None:
        with self.rules.lock:
            self.rules.drop_left = n
            self.rules.drop_method = method

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream).start()
    try:
        yield p
    finally:
        p.stop()
