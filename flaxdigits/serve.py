"""The drawing web app: a FastAPI app over a Predictor, with the page served from the package.

`create_app(predictor)` returns an ASGI app; `digits serve` runs it under uvicorn. Requests go
through exactly the preprocessing of `digits predict` (`to_mnist`), and concurrent requests are
classified together (`batching.Batcher`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import time
from importlib import resources
from typing import Any

import anyio
import numpy as np
import prometheus_client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flaxdigits import batching
from flaxdigits.predict import Predictor

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
REQUEST_TIMEOUT_S = 10.0
# Connections that have not sent complete request headers within this long are closed.
HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 1000
_WEB = resources.files("flaxdigits") / "web"
# Everything the page needs comes from this app: no CDNs, no inline script.
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "style-src 'self'; script-src 'self'; object-src 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class _BodyTooLarge(Exception):
  pass


class LimitsMiddleware:
  """Rejects bodies over `max_bytes` with 413 (by Content-Length, or while streaming), and adds
  security headers to every response."""

  def __init__(self, app: ASGIApp, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"")
    if length.isdigit() and int(length) > self.max_bytes:
      await _too_large(self.max_bytes)(scope, receive, send)
      return
    received = 0
    started = False

    async def counting_receive() -> Message:
      nonlocal received
      message = await receive()
      received += len(message.get("body", b""))
      if received > self.max_bytes:
        raise _BodyTooLarge
      return message

    async def secured_send(message: Message) -> None:
      nonlocal started
      if message["type"] == "http.response.start":
        started = True
        message["headers"] = list(message.get("headers", [])) + [
            (k.encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
      await send(message)

    try:
      await self.app(scope, counting_receive, secured_send)
    except _BodyTooLarge:
      if not started:
        await _too_large(self.max_bytes)(scope, receive, send)


def _too_large(max_bytes: int) -> JSONResponse:
  return JSONResponse({"error": f"upload too large (limit {max_bytes // (1024 * 1024)} MB)"},
                      status_code=413)


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def _png_data_url(image_28x28: np.ndarray) -> str:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray((image_28x28 * 255).round().astype(np.uint8), "L").save(buffer, "PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _image_bytes(request: Request) -> bytes:
  """The uploaded image: multipart field `file`, or JSON {"image": "data:image/...;base64,..."}."""
  content_type = request.headers.get("content-type", "")
  if content_type.startswith("multipart/form-data"):
    form = await request.form(max_files=1, max_fields=4)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
      raise ValueError("multipart form needs a file field named 'file'")
    return await upload.read()
  if content_type.startswith("application/json"):
    try:
      try:
        payload = await request.json()
      except RecursionError:  # [[[[... nested past Python's limit
        raise ValueError from None
      data_url = payload["image"]
      header, _, encoded = data_url.partition(",")
      if not header.startswith("data:image/") or ";base64" not in header:
        raise ValueError
      return base64.b64decode(encoded, validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
      raise ValueError('JSON body must be {"image": "data:image/png;base64,..."}') from None
  raise ValueError("send multipart/form-data with a 'file' field, or JSON with an 'image' "
                   "data URL")


def create_app(predictor: Predictor, *, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               timeout_s: float = REQUEST_TIMEOUT_S, info: dict[str, Any] | None = None,
               processes: int = 0, threads: int | None = None,
               max_pending: int = batching.MAX_PENDING,
               max_batch: int = batching.MAX_BATCH,
               max_wait_s: float = batching.MAX_WAIT_S) -> ASGIApp:
  """The web app over `predictor`, compiled for every batch shape before it answers anything.

  Requests are preprocessed on `processes` processes (or, if 0, on `threads` threads, by
  default one per core) and classified together in batches of up to `max_batch` (see
  `batching.Batcher`: `digits serve` uses one process per core); beyond `max_pending`
  requests in progress, the app answers 503 with Retry-After rather than queueing. GET /metrics
  gives request counts, latencies, batch sizes and queue depth in Prometheus' text format.
  """
  if max_upload_bytes < 1 or timeout_s <= 0:
    raise ValueError(f"the upload limit and timeout must be positive, got {max_upload_bytes} "
                     f"bytes and {timeout_s} s")
  registry = prometheus_client.CollectorRegistry()
  batch_sizes = prometheus_client.Histogram(
      "flaxdigits_batch_size", "Images per model call.", registry=registry,
      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
  batcher = batching.Batcher(predictor, processes=processes, threads=threads,
                             max_pending=max_pending,
                             max_batch=max_batch, max_wait_s=max_wait_s,
                             on_batch=batch_sizes.observe)
  prometheus_client.Gauge("flaxdigits_pending_requests", "Requests admitted and not yet "
                          "answered.", registry=registry).set_function(lambda: batcher.pending)
  prometheus_client.Gauge("flaxdigits_queued_images", "Preprocessed images waiting for the "
                          "model.", registry=registry).set_function(lambda: batcher.queued)
  prometheus_client.ProcessCollector(registry=registry)  # memory, CPU, open files
  batcher.warm_up()

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    await batcher.aclose()

  app = FastAPI(title="flaxdigits", docs_url=None, redoc_url=None, openapi_url=None,
                lifespan=lifespan)
  app.mount("/static", StaticFiles(directory=str(_WEB / "static")), name="static")

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):
    response = _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")
    response.headers.update(exc.headers or {})  # 405's Allow, say
    return response

  @app.exception_handler(RequestValidationError)
  async def validation_error(_, exc):
    return _error(422, "invalid request")

  @app.exception_handler(Exception)
  async def internal_error(_, exc):
    return _error(500, "internal error")  # never a stack trace or a path

  @app.get("/", include_in_schema=False)
  async def index():
    return FileResponse(str(_WEB / "index.html"), media_type="text/html")

  @app.get("/healthz")
  async def healthz():
    return {"status": "ok"} | (info or {})

  @app.get("/metrics")
  async def metrics():
    return Response(prometheus_client.generate_latest(registry),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)

  @app.post("/api/predict")
  async def predict(request: Request):
    try:
      with anyio.fail_after(timeout_s):
        data = await _image_bytes(request)
        result = await batcher.predict(data)
    except batching.Busy:
      response = _error(503, "server busy; retry in a moment")
      response.headers["retry-after"] = "1"
      return response
    except TimeoutError:
      return _error(504, "request timed out")
    except _BodyTooLarge:
      return _too_large(max_upload_bytes)
    except ValueError as e:
      return _error(400, str(e))
    if result.error:
      status = 422 if result.error.startswith("no digit found") else 400
      return JSONResponse({"error": result.error, "digit": None}, status_code=status)
    return JSONResponse({"digit": result.digit, "confidence": result.confidence,
                         "probabilities": result.probabilities, "reason": result.reason,
                         "score": result.score, "threshold": result.threshold,
                         "preprocessed": _png_data_url(result.image)})

  requests = prometheus_client.Counter(
      "flaxdigits_requests", "HTTP requests answered, by route and status.",
      ["route", "status"], registry=registry)
  latency = prometheus_client.Histogram(
      "flaxdigits_request_duration_seconds", "Time from request to the end of the response.",
      ["route"], registry=registry,
      buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
  return MetricsMiddleware(LimitsMiddleware(app, max_upload_bytes), requests, latency)


# Routes as metric labels: a fixed set, so that arbitrary paths cannot grow the label space.
_ROUTES = ("/api/predict", "/healthz", "/metrics", "/static", "/")


class MetricsMiddleware:
  """Counts every HTTP response by route and status, and observes its latency."""

  def __init__(self, app: ASGIApp, requests, latency):
    self.app, self.requests, self.latency = app, requests, latency

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    path = scope["path"]
    route = next((r for r in _ROUTES if path == r or path.startswith(r + "/") and r != "/"),
                 "other")
    start = time.perf_counter()
    status = 500

    async def observing_send(message: Message) -> None:
      nonlocal status
      if message["type"] == "http.response.start":
        status = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, observing_send)
    finally:
      self.requests.labels(route, str(status)).inc()
      self.latency.labels(route).observe(time.perf_counter() - start)


def guarded_http_protocol(header_timeout_s: float = HEADER_TIMEOUT_S,
                          max_connections: int = MAX_CONNECTIONS, parser: str = "auto") -> type:
  """uvicorn's HTTP protocol, closing connections that do not finish their request headers in
  time and refusing connections beyond `max_connections`.

  uvicorn times out idle keep-alive connections, but not a new connection that never completes
  its headers: 20,000 such connections exhausted the file descriptors of an unguarded server.
  Pass the class as `uvicorn.Config(http=...)`. `parser`: "httptools" (C; what "auto" takes
  where it is installed: a sixth less of the server's CPU per request than h11, measured in
  docs/benchmarks.md) or "h11" (pure Python).
  """
  if parser not in ("auto", "httptools", "h11"):
    raise ValueError(f'parser must be "auto", "httptools" or "h11", got {parser!r}')
  if parser != "h11":
    try:
      import httptools  # pylint: disable=import-outside-toplevel,unused-import  # noqa: F401
      from uvicorn.protocols.http.httptools_impl import (  # pylint: disable=import-outside-toplevel
          HttpToolsProtocol)
    except ImportError:
      if parser == "httptools":
        raise
      parser = "h11"
  if parser == "h11":
    import h11  # pylint: disable=import-outside-toplevel
    from uvicorn.protocols.http.h11_impl import H11Protocol  # pylint: disable=import-outside-toplevel

  class Guard:
    """What both protocols add: a timer from the connection (or the last response) to the next
    request's complete headers, and the connection cap."""

    def connection_made(self, transport) -> None:
      self._header_timer = None
      super().connection_made(transport)
      if len(self.connections) > max_connections:
        transport.close()
        return
      self._arm_header_timer()

    def on_response_complete(self) -> None:
      super().on_response_complete()
      self._arm_header_timer()  # the next request's headers get the same time

    def _arm_header_timer(self) -> None:
      if self._header_timer is not None:
        self._header_timer.cancel()
      self._header_timer = self.loop.call_later(header_timeout_s, self._headers_overdue)

    def _headers_overdue(self) -> None:
      if self._awaiting_headers() and not self.transport.is_closing():
        self.transport.close()  # no complete request headers in time

    def connection_lost(self, exc) -> None:
      if getattr(self, "_header_timer", None) is not None:
        self._header_timer.cancel()
      super().connection_lost(exc)

  if parser == "h11":
    class GuardedH11Protocol(Guard, H11Protocol):

      def _awaiting_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE

    return GuardedH11Protocol

  class GuardedHttpToolsProtocol(Guard, HttpToolsProtocol):
    _headers_done = _answered = 0  # requests whose headers arrived; responses sent

    def on_headers_complete(self) -> None:
      self._headers_done += 1
      super().on_headers_complete()

    def on_response_complete(self) -> None:
      self._answered += 1
      super().on_response_complete()

    def _awaiting_headers(self) -> bool:
      # Every request whose headers arrived has been answered (pipelined ones included).
      return self._headers_done == self._answered

  return GuardedHttpToolsProtocol


def log_config() -> dict[str, Any]:
  """uvicorn's logging set-up, with its access log (one line per request, on stdout) and only
  warnings and errors from the server itself (the CLI says what it serves)."""
  import copy  # pylint: disable=import-outside-toplevel

  from uvicorn.config import LOGGING_CONFIG  # pylint: disable=import-outside-toplevel
  config = copy.deepcopy(LOGGING_CONFIG)
  config["loggers"]["uvicorn.error"]["level"] = "WARNING"
  config["loggers"]["uvicorn.access"]["level"] = "INFO"
  return config
