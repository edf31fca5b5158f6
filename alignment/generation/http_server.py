"""The HTTP side of an OpenAI-compatible server: routing, JSON bodies and errors, server-sent events, and containment
of hostile or departed clients. What answers a request is a service object with `models()`,
`chat_completions(body)` and `completions(body)`, each returning a JSON-serialisable dict, or an iterator of them
for a streamed answer (sent as server-sent events), or raising `RequestError` (`alignment.serve.Service` over the
engine, the PAS teacher's rule-based stand-in).

Containment: at most `max_connections` connections are served at once (more get 503 at once, closed after a
grace period so the client reads its answer), every socket read waits at most `read_timeout` seconds and a
request body must arrive within it (else 408), and while a service call runs, `client_gone` holds a check of
its connection (also while a streamed answer is written), so a generation can stop (engine `Cancelled`) when
the client has gone away.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import http.server
import json
import select
import socket
import sys
import threading
import time
from typing import Callable, Iterator

from absl import logging

from alignment.generation.engine import Cancelled

MAX_BODY_BYTES = 16 << 20
REFUSED_GRACE_S = 1.0  # a refused connection is closed this long after its 503, once its request has arrived
MAX_REFUSED = 256  # refused connections waiting for that close; beyond it the oldest are closed at once

# The current request's "has the client gone away" check, set by the handler thread around a service call;
# None outside a request (a Service called directly).
client_gone: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("client_gone", default=None)


class RequestError(ValueError):
    """A client error: answered with `status` and the OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to `self.server.service`; every answer is JSON.

    A failure to write to a client that went away propagates to `Server.handle_error`, which logs one line.
    """

    protocol_version = "HTTP/1.1"
    routes = {"/v1/chat/completions": "chat_completions", "/v1/completions": "completions"}

    def setup(self):
        self.timeout = self.server.read_timeout  # socketserver applies it to every read and write of the socket
        super().setup()

    def do_GET(self):
        path = self.path.rstrip("/")
        if path == "/v1/models":
            return self._send(200, self.server.service.models())
        if path == "/health":
            return self._send(200, {"status": "ok"})
        if path in self.routes:
            return self._error(RequestError(f"use POST for {path}", status=405))
        return self._error(RequestError(f"unknown path {self.path}", status=404))

    def do_POST(self):
        path = self.path.rstrip("/")
        try:
            if path not in self.routes:
                raise RequestError(f"unknown path {self.path}; POST /v1/chat/completions or /v1/completions",
                                   status=404)
            body = self._read_json()
            token = client_gone.set(self._client_gone)
            try:
                answer = getattr(self.server.service, self.routes[path])(body)
                if not isinstance(answer, dict):  # a streamed answer: written as it is generated
                    return self._send_events(answer)
            finally:
                client_gone.reset(token)
        except RequestError as e:
            return self._error(e)
        except Cancelled as e:
            logging.info("%s went away; its generation stopped after %d tokens", self.address_string(), e.tokens)
            self.close_connection = True
            return None
        except ValueError as e:  # invalid settings found deeper (e.g. sampling parameters)
            return self._error(RequestError(str(e)))
        except Exception as e:  # a bug, not the client's fault: say so and keep serving
            logging.exception("request to %s failed", path)
            return self._error(RequestError(f"internal error: {type(e).__name__}: {e}", status=500))
        self._send(200, answer)

    def _send_events(self, events: Iterator[dict]) -> None:
        """Server-sent events: `data: <json>` per chunk body, then `data: [DONE]`; the connection closes after
        them (the stream has no length to announce). A failing chunk after the head is sent as an error event. A
        client that stops reading ends the iterator (which cancels its generation) and the connection."""
        try:
            first = next(events, None)  # errors before anything is generated are still plain JSON answers
        except Exception:
            events.close()
            raise
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            chunk = first
            while chunk is not None:
                self._write_event(json.dumps(chunk))
                try:
                    chunk = next(events, None)
                except Cancelled:
                    raise
                except Exception as e:  # noqa: BLE001  too late for a status code: say it in the stream
                    logging.exception("streamed request failed")
                    chunk = None
                    self._write_event(json.dumps(RequestError(f"internal error: {type(e).__name__}: {e}",
                                                              status=500).body()))
            self._write_event("[DONE]")
        except (ConnectionError, TimeoutError) as e:  # the client stopped reading: nothing to debug
            logging.info("%s: stream dropped (%s: %s)", self.address_string(), type(e).__name__, e)
        finally:
            events.close()

    def _write_event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("a Content-Length header is required", status=411) from None
        if length < 0:
            raise RequestError(f"Content-Length must be >= 0, got {length}")
        if length > MAX_BODY_BYTES:
            raise RequestError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}", status=413)
        raw = self._read_body(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def _read_body(self, length: int) -> bytes:
        """`length` bytes of body, which must all arrive within the read timeout (a trickle does not extend it)."""
        deadline = time.monotonic() + self.server.read_timeout
        parts, missing = [], length
        try:
            while missing:
                self.connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                part = self.rfile.read1(missing)
                if not part:
                    raise RequestError(f"the connection closed after {length - missing} of {length} body bytes")
                parts.append(part)
                missing -= len(part)
                if missing and time.monotonic() >= deadline:
                    raise TimeoutError
        except TimeoutError:
            raise RequestError(f"{length - missing} of the {length} body bytes arrived within "
                               f"{self.server.read_timeout:g} s", status=408) from None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(parts)

    def _client_gone(self) -> bool:
        """True when the client has closed or reset its connection (a waiting end-of-stream or error)."""
        poller = select.poll()  # not select.select, which fails on descriptors above 1023
        poller.register(self.connection, select.POLLIN)
        try:
            return bool(poller.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _error(self, e: RequestError):
        self.close_connection = True  # the body may be unread; do not parse it as the next request
        self._send(e.status, e.body(), retry_after=e.status in (429, 503))

    def _send(self, status: int, payload: dict, retry_after: bool = False):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        """One line per request: to the server's access log when it has one (the serve command's), else absl INFO."""
        (self.server.access_log or logging).info("%s %s", self.address_string(), format % args)


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them; a connection beyond gets 503 at once."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog; the default 5 drops a burst of concurrent clients' connects

    def __init__(self, address: tuple[str, int], service, max_connections: int = 64, read_timeout: float = 30.0,
                 access_log=None):
        """service: has models(), chat_completions(body) and completions(body) (`Service` or a stand-in);
        read_timeout: seconds any socket read may wait, and the time a request body has to arrive in;
        access_log: the `logging.Logger` the one line per request goes to (None: absl's INFO)."""
        if max_connections < 1 or not read_timeout > 0:
            raise ValueError(f"max_connections must be >= 1 and read_timeout > 0, got {max_connections} and "
                             f"{read_timeout}")
        super().__init__(address, Handler)
        self.service, self.max_connections, self.read_timeout = service, max_connections, read_timeout
        self.access_log = access_log
        self._slots = threading.BoundedSemaphore(max_connections)
        self._refused = collections.deque()  # (time refused, socket) waiting to be closed

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            return self._refuse(request, client_address)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise
        return None

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket, client_address) -> None:
        """Answers 503 without blocking the accept loop. The socket is closed a grace period later, after the
        client's request has arrived and been read: closing over unread bytes resets the connection, and the
        client could lose the 503."""
        logging.warning("%s refused: %d connections in flight", client_address[0], self.max_connections)
        error = RequestError(f"the server is busy ({self.max_connections} connections in flight); retry shortly",
                             code="server_busy", status=503)
        data = json.dumps(error.body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + data)  # a few hundred bytes: the fresh socket's send buffer takes them whole
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._refused.append((time.monotonic(), request))

    def service_actions(self):
        """Closes refused connections whose grace period is over (serve_forever calls this every poll)."""
        while self._refused and (len(self._refused) > MAX_REFUSED or
                                 time.monotonic() - self._refused[0][0] > REFUSED_GRACE_S):
            self._close_refused(self._refused.popleft()[1])

    @staticmethod
    def _close_refused(sock: socket.socket) -> None:
        try:
            for _ in range(16):  # what the client sent, so closing does not reset the connection
                if not sock.recv(1 << 16):
                    break
        except OSError:
            pass
        sock.close()

    def server_close(self):
        super().server_close()
        while self._refused:
            self._close_refused(self._refused.popleft()[1])

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):  # the client left or stalled: nothing to debug
            logging.info("%s: connection dropped (%s: %s)", client_address[0], type(error).__name__, error)
        else:
            logging.exception("request from %s failed", client_address[0])


def make_server(service, host: str = "127.0.0.1", port: int = 0, max_connections: int = 64,
                read_timeout: float = 30.0, access_log=None) -> Server:
    """A server bound to (host, port); port 0 picks a free one (see `server.server_address`). See `Server`."""
    return Server((host, port), service, max_connections, read_timeout, access_log)


@contextlib.contextmanager
def serving(service, host: str = "127.0.0.1", port: int = 0, **options) -> Iterator[str]:
    """The base URL (http://host:port) of `service` served from a background thread for the block; then the server
    stops and the service is closed (if it has `close`). `options` go to `make_server`."""
    server = make_server(service, host, port, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        if hasattr(service, "close"):
            service.close()
