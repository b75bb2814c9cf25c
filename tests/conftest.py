"""Strict JAX and small fixtures: four fake CPU devices so the sharded code paths run."""

import contextlib
import gzip
import os
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Rendered outlier pools (flaxdigits.outliers) shared by the suite's processes, not in ~/.cache.
os.environ.setdefault("FLAXDIGITS_OUTLIER_CACHE", os.path.join(
    tempfile.gettempdir(), f"flaxdigits-test-outliers-{os.getuid()}"))

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_debug_nans", False)

# A committed slice of real MNIST (the first 512 training and 300 test images, 130 KB): unit
# tests run from a fresh clone with nothing else.
SMALL_DIR = Path(__file__).resolve().parent / "data" / "mnist-small"
# The whole of MNIST, for the real-data tests: $FLAXDIGITS_TEST_DATA, then ../shared/data/mnist
# beside the checkout, then tensorflow-datasets (which downloads it where there is a network).
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _real_mnist_dir() -> Path | None:
  """The folder of the four real MNIST files, or None to use tensorflow-datasets."""
  if os.environ.get("FLAXDIGITS_TEST_DATA"):
    path = Path(os.environ["FLAXDIGITS_TEST_DATA"])
    if not (path / "t10k-labels-idx1-ubyte.gz").is_file():
      pytest.fail(f"FLAXDIGITS_TEST_DATA={path} does not hold the four MNIST IDX files")
    return path
  if (SHARED_MNIST / "t10k-labels-idx1-ubyte.gz").is_file():
    return SHARED_MNIST
  from flaxdigits import data
  try:
    data.load_tfds_split("test")  # prepares (downloads) MNIST once where it can
  except FileNotFoundError as e:
    pytest.skip(f"real MNIST not found: set FLAXDIGITS_TEST_DATA to a folder with the four IDX "
                f"files, put them in {SHARED_MNIST}, or let tensorflow-datasets download them "
                f"({e})")
  return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path | None:
  """Where the real-data tests read MNIST: a folder, or None for tensorflow-datasets."""
  return _real_mnist_dir()


@pytest.fixture(scope="session")
def mnist_args(mnist_dir) -> list[str]:
  """The `--data-dir` option a CLI call on real MNIST needs (none for tensorflow-datasets)."""
  return [] if mnist_dir is None else ["--data-dir", str(mnist_dir)]


@pytest.fixture(scope="session")
def mnist(mnist_dir):
  from flaxdigits.data import load_mnist
  return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def small():
  """512 training and 300 test images of real MNIST, from the committed slice."""
  from flaxdigits.data import load_mnist
  return load_mnist(SMALL_DIR)


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None,
              compress: bool = True) -> Path:
  """Writes `array` (uint8) as an IDX file, as MNIST's own files are laid out."""
  magic = magic if magic is not None else 0x0800 | array.ndim
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
  path.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)
  return path


@pytest.fixture(scope="session")
def tiny_data_dir() -> Path:
  """A data folder holding the small split as the four standard IDX files."""
  return SMALL_DIR


@pytest.fixture(scope="session")
def tiny_checkpoint(small, tmp_path_factory) -> Path:
  """A narrow CNN trained for one epoch on the small split: a real checkpoint in seconds."""
  from flaxdigits.config import ModelConfig, TrainConfig
  from flaxdigits.training import train
  directory = tmp_path_factory.mktemp("tiny") / "ckpt"
  train(small, ModelConfig(conv_features=(8,), dense_features=(32,)),
        TrainConfig(epochs=1, batch_size=64, validation=64), checkpoint_dir=str(directory))
  return directory


@pytest.fixture(scope="session")
def real_checkpoint(mnist_args, tmp_path_factory):
  """The default model and recipe, one epoch over all 60,000 images, through the CLI."""
  import json

  from typer.testing import CliRunner

  from flaxdigits.cli.main import app
  ckpt = tmp_path_factory.mktemp("e2e") / "ckpt"
  trained = CliRunner().invoke(app, ["train", "--epochs", "1", *mnist_args,
                                     "--checkpoint", str(ckpt), "--json"])
  assert trained.exit_code == 0, trained.output
  assert json.loads(trained.stdout)["step"] == 55_000 // 128  # 5,000 held out
  return ckpt


@contextlib.contextmanager
def serving(app, **config):
  """Runs an ASGI app under uvicorn (uvicorn.Config options in `config`) in a thread on a free
  loopback port; yields its base URL."""
  import socket
  import threading
  import time

  import uvicorn
  sock = socket.create_server(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(10)
