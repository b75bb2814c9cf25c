import base64
import dataclasses
import io
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import serving
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from flaxdigits.cli.main import app as cli
from flaxdigits import batching
from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.predict import Predictor
from flaxdigits.preprocess import to_mnist
from flaxdigits.serve import create_app
from flaxdigits.training import train


@pytest.fixture(scope="module")
def predictor(small, tmp_path_factory):
  directory = tmp_path_factory.mktemp("serve") / "ckpt"
  train(small, ModelConfig(conv_features=(8,), dense_features=(32,)),
        TrainConfig(epochs=1, batch_size=64, validation=64), checkpoint_dir=str(directory))
  return Predictor.from_checkpoint(directory)


@pytest.fixture(scope="module")
def client(predictor):
  return TestClient(create_app(predictor, max_upload_bytes=200_000))


def png(array_uint8: np.ndarray, size: int = 112) -> bytes:
  """A dark-on-light PNG of an MNIST digit, as a drawing or scan would look."""
  buffer = io.BytesIO()
  Image.fromarray(255 - array_uint8).resize((size, size), Image.BICUBIC).save(buffer, "PNG")
  return buffer.getvalue()


def data_url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def test_multipart_and_data_url_give_what_predict_gives(client, predictor, small):
  image = png(small["test"].images[0])
  [expected] = predictor.predict([image])
  for response in (client.post("/api/predict", files={"file": ("d.png", image, "image/png")}),
                   client.post("/api/predict", json={"image": data_url(image)})):
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["digit"] == expected.digit
    np.testing.assert_allclose(out["probabilities"], expected.probabilities, atol=1e-6)
    assert out["confidence"] == pytest.approx(max(out["probabilities"]))
    seen = Image.open(io.BytesIO(base64.b64decode(out["preprocessed"].split(",", 1)[1])))
    np.testing.assert_allclose(np.asarray(seen) / 255, expected.image, atol=1 / 255)


def test_not_a_digit_is_an_answer_with_its_score(predictor, small):
  """A rejected input is a 200 with digit null, the reason, its score and the threshold."""
  unsure = Predictor(predictor._probabilities, calibration=dataclasses.replace(  # pylint: disable=protected-access
      predictor.calibration, threshold=1.01))  # above any probability: everything is rejected
  with TestClient(create_app(unsure, max_upload_bytes=200_000)) as rejecting:
    response = rejecting.post("/api/predict", files={"file": ("d.png",
                                                              png(small["test"].images[0]))})
  assert response.status_code == 200, response.text
  out = response.json()
  assert out["digit"] is None and out["reason"] == "not a digit" and out["threshold"] == 1.01
  assert out["score"] == pytest.approx(max(out["probabilities"])) == out["confidence"]


def test_page_healthz_and_security_headers(client):
  page = client.get("/")
  assert page.status_code == 200 and '<canvas id="pad"' in page.text
  assert "http" not in page.text.split("<body>")[1]  # nothing from a CDN
  assert "default-src 'self'" in page.headers["content-security-policy"]
  assert client.get("/static/app.js").status_code == 200
  assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/static/../serve.py", "/static/%2e%2e/serve.py",
                                  "/static/..%2fserve.py", "/static/%2e%2e%2f%2e%2e/etc/passwd",
                                  "/static//etc/passwd", "/nothing"])
def test_no_path_traversal(client, path):
  response = client.get(path)
  assert response.status_code == 404
  assert response.json() == {"error": "Not Found"}


def test_upload_over_the_limit_is_413(client):
  big = b"\x89PNG" + b"0" * 300_000
  by_length = client.post("/api/predict", files={"file": ("big.png", big, "image/png")})
  assert by_length.status_code == 413 and "too large" in by_length.json()["error"]

  def chunks():  # no Content-Length: counted while streaming
    for _ in range(10):
      yield b"0" * 50_000
  streamed = client.post("/api/predict", content=chunks(),
                         headers={"content-type": "application/json"})
  assert streamed.status_code == 413


@pytest.mark.parametrize("kwargs, status, message", [
    ({"files": {"file": ("notes.txt", b"hello", "text/plain")}}, 400, "not an image"),
    ({"files": {"file": ("cut.png", png(np.eye(28, dtype=np.uint8) * 255)[:60])}}, 400,
     "image"),
    ({"files": {"other": ("d.png", b"x")}}, 400, "'file'"),
    ({"json": {"image": "not a data url"}}, 400, "data:image/png;base64"),
    ({"json": {"picture": 1}}, 400, "data:image/png;base64"),
    ({"content": b"{broken", "headers": {"content-type": "application/json"}}, 400, "JSON"),
    ({"content": b"raw", "headers": {"content-type": "text/plain"}}, 400, "multipart"),
])
def test_bad_requests_are_json_4xx_without_internals(client, kwargs, status, message):
  response = client.post("/api/predict", **kwargs)
  assert response.status_code == status, response.text
  text = response.json()["error"]
  assert message in text
  assert "Traceback" not in response.text
  assert not re.search(r"(/[\w.-]+){2,}", text)  # no file system paths


def test_blank_drawing_is_no_digit_not_a_guess(client):
  buffer = io.BytesIO()
  Image.new("RGB", (280, 280), "white").save(buffer, "PNG")
  response = client.post("/api/predict", json={"image": data_url(buffer.getvalue())})
  assert response.status_code == 422
  assert response.json() == {"error": response.json()["error"], "digit": None}
  assert "no digit found" in response.json()["error"]


def test_slow_request_times_out(predictor, small, monkeypatch):
  slow = TestClient(create_app(predictor, timeout_s=0.2))
  monkeypatch.setattr(batching, "to_mnist", lambda s: time.sleep(1.0) or to_mnist(s))
  response = slow.post("/api/predict", files={"file": png(small["test"].images[0])})
  assert response.status_code == 504 and response.json() == {"error": "request timed out"}


@pytest.fixture()
def live_server(predictor):
  with serving(create_app(predictor)) as url:
    yield url


def test_concurrent_requests_each_get_their_own_answer(live_server, predictor, small):
  images = [png(small["test"].images[i]) for i in range(24)]
  expected = [p.probabilities for p in predictor.predict(images)]

  def ask(i):
    with httpx.Client(base_url=live_server, timeout=30) as http:
      return http.post("/api/predict", files={"file": images[i]}).json()["probabilities"]

  with ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(ask, range(24)))
  for got, want in zip(answers, expected):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_cli_serve_errors_are_one_line(tmp_path):
  runner = CliRunner()
  missing = runner.invoke(cli, ["serve", "-c", str(tmp_path / "none"), "--port", "0"])
  assert missing.exit_code == 1 and "checkpoint directory not found" in missing.stderr
  with socket.create_server(("127.0.0.1", 0)) as busy:
    port = busy.getsockname()[1]
    taken = runner.invoke(cli, ["serve", "-c", str(tmp_path), "--port", str(port)])
  assert taken.exit_code == 1 and f"cannot serve on 127.0.0.1:{port}" in taken.stderr
  assert "Traceback" not in missing.output + taken.output


@pytest.mark.parametrize("limits", [{"max_upload_bytes": 0}, {"timeout_s": -1.0}])
def test_limits_must_be_positive(predictor, limits):
  with pytest.raises(ValueError, match="must be positive"):
    create_app(predictor, **limits)


def test_metrics_count_requests_by_route_and_status_batch_sizes_and_queue(predictor, small):
  from prometheus_client.parser import text_string_to_metric_families
  fresh = TestClient(create_app(predictor, max_upload_bytes=200_000))
  for i in range(3):
    assert fresh.post("/api/predict", files={"file": png(small["test"].images[i])}).is_success
  assert fresh.post("/api/predict", files={"file": ("t.txt", b"hi")}).status_code == 400
  assert fresh.post("/api/predict", content=b"0" * 300_000).status_code == 413
  fresh.get("/nothing/../../etc")
  response = fresh.get("/metrics")
  assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
  samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(response.text)
             for s in family.samples}
  count = lambda route, status: samples[("flaxdigits_requests_total",  # noqa: E731
                                         (("route", route), ("status", status)))]
  assert count("/api/predict", "200") == 3
  assert count("/api/predict", "400") == 1 and count("/api/predict", "413") == 1
  assert count("other", "404") == 1  # any unknown path is one label, not one per path
  assert samples[("flaxdigits_request_duration_seconds_count", (("route", "/api/predict"),))] == 5
  assert samples[("flaxdigits_batch_size_count", ())] == 3  # three requests, one at a time
  assert samples[("flaxdigits_batch_size_sum", ())] == 3
  assert samples[("flaxdigits_pending_requests", ())] == 0
  assert samples[("flaxdigits_queued_images", ())] == 0
  assert samples[("process_resident_memory_bytes", ())] > 0
