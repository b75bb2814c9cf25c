"""Strict JAX and small fixtures: four fake CPU devices so the sharded code paths run."""

import contextlib
import gzip
import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_debug_nans", False)

MNIST_DIR = Path(os.environ.get(
    "FLAXDIGITS_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
  if not (MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
    pytest.fail(f"real MNIST not found in {MNIST_DIR} (set FLAXDIGITS_TEST_DATA)")
  return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
  from flaxdigits.data import load_mnist
  return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def small(mnist):
  """512 training and 300 test images of real MNIST."""
  from flaxdigits.data import Split
  return {"train": Split(mnist["train"].images[:512], mnist["train"].labels[:512]),
          "test": Split(mnist["test"].images[:300], mnist["test"].labels[:300])}


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None,
              compress: bool = True) -> Path:
  """Writes `array` (uint8) as an IDX file, as MNIST's own files are laid out."""
  magic = magic if magic is not None else 0x0800 | array.ndim
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)
  return path


@pytest.fixture(scope="session")
def tiny_data_dir(small, tmp_path_factory) -> Path:
  """A data folder holding the small split as the four standard IDX files."""
  root = tmp_path_factory.mktemp("tiny-mnist")
  for split, stem in (("train", "train"), ("test", "t10k")):
    write_idx(root / f"{stem}-images-idx3-ubyte.gz", small[split].images)
    write_idx(root / f"{stem}-labels-idx1-ubyte.gz", small[split].labels)
  return root


@pytest.fixture(scope="session")
def real_checkpoint(mnist_dir, tmp_path_factory):
  """The default model and recipe, one epoch over all 60,000 images, through the CLI."""
  import json

  from typer.testing import CliRunner

  from flaxdigits.cli.main import app
  ckpt = tmp_path_factory.mktemp("e2e") / "ckpt"
  trained = CliRunner().invoke(app, ["train", "--epochs", "1", "--data-dir", str(mnist_dir),
                                     "--checkpoint", str(ckpt), "--json"])
  assert trained.exit_code == 0, trained.output
  assert json.loads(trained.stdout)["step"] == 60_000 // 128
  return ckpt


@contextlib.contextmanager
def serving(app):
  """Runs an ASGI app under uvicorn in a thread on a free loopback port; yields its base URL."""
  import socket
  import threading
  import time

  import uvicorn
  sock = socket.create_server(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(10)
