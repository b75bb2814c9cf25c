"""The drawing web app: a FastAPI app over a Predictor, with the page served from the package.

`create_app(predictor)` returns an ASGI app; `digits serve` runs it under uvicorn. Requests go
through exactly the preprocessing of `digits predict` (`Predictor.predict`).
"""

from __future__ import annotations

import base64
import binascii
import io
from importlib import resources
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flaxdigits.predict import Predictor

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
REQUEST_TIMEOUT_S = 10.0
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
      payload = await request.json()
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
               ) -> ASGIApp:
  """The web app over `predictor`, compiled for one image before it answers anything."""
  if max_upload_bytes < 1 or timeout_s <= 0:
    raise ValueError(f"the upload limit and the timeout must be positive, got "
                     f"{max_upload_bytes} bytes and {timeout_s} s")
  predictor.warm_up()
  app = FastAPI(title="flaxdigits", docs_url=None, redoc_url=None, openapi_url=None)
  app.mount("/static", StaticFiles(directory=str(_WEB / "static")), name="static")

  @app.exception_handler(HTTPException)
  async def http_error(_, exc: HTTPException):
    return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

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

  @app.post("/api/predict")
  async def predict(request: Request):
    try:
      with anyio.fail_after(timeout_s):
        data = await _image_bytes(request)
        # Abandoned on timeout: the client gets its answer; the thread finishes on its own.
        [result] = await anyio.to_thread.run_sync(predictor.predict, [data],
                                                  abandon_on_cancel=True)
    except TimeoutError:
      return _error(504, "request timed out")
    except _BodyTooLarge:
      return _too_large(max_upload_bytes)
    except ValueError as e:
      return _error(400, str(e))
    if result.error:
      status = 422 if result.error.startswith("no digit found") else 400
      return JSONResponse({"error": result.error, "digit": None}, status_code=status)
    return {"digit": result.digit, "confidence": result.confidence,
            "probabilities": result.probabilities, "preprocessed": _png_data_url(result.image)}

  return LimitsMiddleware(app, max_upload_bytes)
