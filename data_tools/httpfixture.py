"""A local HTTP server on 127.0.0.1 for tests and benchmarks of the URL and remote-shard readers.

``with LocalServer(routes, latency_s=0.05) as srv: srv.url("/a.jpg")`` serves each route from a
thread pool until the block ends. A route is a :class:`Route`: a body with a content type, or a
behaviour (``status``, ``fail_first`` 500s before succeeding, ``stall_s`` before the body,
``redirect`` to another path, ``lie_length`` to announce a small size and send a big body,
``cut_after`` bytes to drop the connection mid-body, ``drip_s`` between single body bytes,
``content_type=None`` for no Content-Type header). ``srv.hits[path]`` counts the requests.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # listen backlog: many clients connect at once
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that drops its connection (a keep-alive socket closed, a timeout) is no server
        error: stay quiet about it; print anything else as socketserver does."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


@dataclass
class Route:
    body: bytes = b""
    content_type: str | None = "image/jpeg"  # None: no Content-Type header
    status: int = 200
    fail_first: int = 0  # answer 500 to the first N requests
    stall_s: float = 0.0  # wait this long after the headers before sending the body
    redirect: str = ""  # 302 to this path
    send_length: bool = True  # False: no Content-Length (the size cap must hold while streaming)
    cut_after: int = -1  # send this many body bytes, then close the connection (fail_first times only)
    drip_s: float = 0.0  # send the body one byte at a time, this long apart (a slow-loris host)


class LocalServer:
    def __init__(self, routes: dict[str, Route], latency_s: float = 0.0):
        self.routes, self.latency_s = routes, latency_s
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave at once (no delayed-ACK stall)

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server._serve(self)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.hits[path] += 1
            n = self.hits[path]
        if self.latency_s:
            time.sleep(self.latency_s)
        route = self.routes.get(path)
        try:
            if route is None:
                return self._send(h, 404, b"not found", "text/plain")
            if route.redirect:
                h.send_response(302)
                h.send_header("Location", route.redirect)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return None
            if n <= route.fail_first and route.cut_after < 0:
                return self._send(h, 500, b"try again", "text/plain")
            if route.status != 200:
                return self._send(h, route.status, b"error", "text/plain")
            h.send_response(200)
            if route.content_type is not None:
                h.send_header("Content-Type", route.content_type)
            if route.send_length:
                h.send_header("Content-Length", str(len(route.body)))
            else:
                h.send_header("Connection", "close")
            h.end_headers()
            if route.stall_s:
                time.sleep(route.stall_s)
            if route.cut_after >= 0 and n <= route.fail_first:
                h.wfile.write(route.body[: route.cut_after])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(2)
                return None
            if route.drip_s:
                for i in range(len(route.body)):
                    h.wfile.write(route.body[i : i + 1])
                    h.wfile.flush()
                    time.sleep(route.drip_s)
            else:
                h.wfile.write(route.body)
            if not route.send_length:
                h.close_connection = True
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up (timeout, size cap)
        return None

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
