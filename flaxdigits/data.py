"""MNIST as uint8 numpy arrays: from local IDX files or through tensorflow-datasets."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import math
import os
import socket
import zlib
from pathlib import Path

import numpy as np

from flaxdigits.config import NUM_CLASSES

DATA_DIR_ENV = "FLAXDIGITS_DATA_DIR"
SPLITS = ("train", "test")
IMAGE_SHAPE = (28, 28)
# MNIST's published counts. Files in the same format with other counts are accepted.
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_IDX_STEMS = {
    ("train", "images"): "train-images",
    ("train", "labels"): "train-labels",
    ("test", "images"): "t10k-images",
    ("test", "labels"): "t10k-labels",
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
# The largest IDX body read: MNIST's training images are 47 MB; EMNIST-sized sets fit too.
MAX_IDX_BYTES = 1 << 30
_TFDS_HOST = ("storage.googleapis.com", 443)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: images_NxHxW uint8 in [0, 255], labels_N uint8 in [0, 9]."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def normalize(images_uint8: "np.ndarray") -> "np.ndarray":
  """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]: the model's input format.

  Works on numpy and jax arrays alike, so the train step and host code share it.
  """
  return (images_uint8.astype("float32") / 255.0)[..., None]


def load_mnist(data_dir: str | os.PathLike | None = None, splits: tuple[str, ...] = SPLITS,
               *, tfds_data_dir: str | None = None) -> dict[str, Split]:
  """Loads MNIST splits.

  Args:
    data_dir: a folder with the four MNIST IDX files; defaults to $FLAXDIGITS_DATA_DIR. When
      neither is set, MNIST comes through tensorflow-datasets.
    splits: which of "train" and "test" to load.
    tfds_data_dir: where TFDS keeps prepared datasets (TFDS's default when None).

  Raises:
    FileNotFoundError: a file is missing, or TFDS cannot reach its download server.
    ValueError: a file is not valid MNIST IDX data.
  """
  for split in splits:
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
  if data_dir is not None:
    return {split: load_idx_split(data_dir, split) for split in splits}
  return {split: load_tfds_split(split, data_dir=tfds_data_dir) for split in splits}


# ----------------------------------------------------------------------------- IDX files


def find_idx_file(data_dir: str | os.PathLike, split: str, kind: str) -> Path:
  """Finds e.g. train-images-idx3-ubyte[.gz] or train-images.idx3-ubyte[.gz] in data_dir."""
  root = Path(data_dir).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"MNIST data folder not found: {root}")
  stem, ndim = _IDX_STEMS[(split, kind)], 3 if kind == "images" else 1
  for sep in ("-", "."):
    for suffix in (".gz", ""):
      path = root / f"{stem}{sep}idx{ndim}-ubyte{suffix}"
      if path.is_file():
        return path
  raise FileNotFoundError(f"missing MNIST file {stem}-idx{ndim}-ubyte[.gz] in {root}")


def read_idx(path: str | os.PathLike, expected_magic: int,
             max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
  """Reads one IDX file (gzipped or raw) into a uint8 array, validating its header and size.

  The header's shape is checked against `max_bytes` before the data is read or inflated, and no
  more than the header promises (plus one byte, to notice trailing data) is ever inflated: a
  small gzip that would expand to gigabytes costs nothing.
  """
  path = Path(path)
  try:
    with open(path, "rb") as raw_file:
      gzipped = raw_file.read(2) == b"\x1f\x8b"
      raw_file.seek(0)
      stream = gzip.GzipFile(fileobj=raw_file) if gzipped else raw_file
      head = stream.read(4)
      if len(head) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(head)} bytes)")
      magic = int.from_bytes(head, "big")
      if magic != expected_magic:
        raise ValueError(f"{path}: bad magic number {magic}, expected {expected_magic}")
      ndim = magic & 0xFF
      dims = stream.read(4 * ndim)
      if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated header")
      shape = tuple(int.from_bytes(dims[4 * i: 4 + 4 * i], "big") for i in range(ndim))
      size = math.prod(shape)
      if size > max_bytes:
        raise ValueError(f"{path}: header shape {shape} declares {size:,} bytes, more than the "
                         f"{max_bytes:,} this reader accepts")
      body = stream.read(size + 1)
  except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise ValueError(f"{path}: cannot read ({e})") from None
  if len(body) != size:
    header = 4 + 4 * ndim
    raise ValueError(f"{path}: {header + len(body)}{'+' * (len(body) > size)} bytes, but header "
                     f"shape {shape} needs {header + size} (truncated or corrupt)")
  return np.frombuffer(body, np.uint8).reshape(shape)


def load_idx_split(data_dir: str | os.PathLike, split: str) -> Split:
  images_path = find_idx_file(data_dir, split, "images")
  labels_path = find_idx_file(data_dir, split, "labels")
  images = read_idx(images_path, _IMAGES_MAGIC)
  labels = read_idx(labels_path, _LABELS_MAGIC)
  if images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
  if len(images) != len(labels):
    raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has "
                     f"{len(labels)} labels")
  if labels.max(initial=0) >= NUM_CLASSES:
    raise ValueError(f"{labels_path}: label {labels.max()} out of range 0-9")
  return Split(images=images, labels=labels)


# ----------------------------------------------------------------------------- TFDS


def _tfds_server_reachable(timeout: float = 3.0) -> bool:
  try:
    socket.create_connection(_TFDS_HOST, timeout=timeout).close()
    return True
  except OSError:
    return False


@contextlib.contextmanager
def _quiet_absl(fragment: str):
  """Drops absl log records containing `fragment` while the block runs (only those: the library
  configures no logging)."""
  logger = logging.getLogger("absl")
  drop = logging.Filter()
  drop.filter = lambda record: fragment not in record.getMessage()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def _import_tfds():
  """Imports TFDS with TensorFlow kept off any GPU, which belongs to JAX."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FileNotFoundError(
        f"loading MNIST through tensorflow-datasets needs it installed ({e.name} is missing): "
        "pip install 'flaxdigits[tfds]', or pass --data-dir DIR with the MNIST IDX files") from None
  tf.config.set_visible_devices([], "GPU")
  return tfds


def load_tfds_split(split: str, data_dir: str | None = None) -> Split:
  """Loads one split through tensorflow-datasets, downloading it on first use."""
  tfds = _import_tfds()
  with _quiet_absl("has no dataset_info.json"):  # TFDS's own note on a dataset not yet prepared
    builder = tfds.builder("mnist", data_dir=data_dir)
    prepared = builder.is_prepared()
  if not prepared and not _tfds_server_reachable():
    raise FileNotFoundError(
        "cannot download MNIST through tensorflow-datasets (no network); pass --data-dir DIR "
        f"(or set {DATA_DIR_ENV}) with the four MNIST IDX files")
  # batch_size=-1 crashes TF 2.21 under tfds.testing.mock_data; iterating large batches
  # is as fast and works everywhere.
  ds = tfds.load("mnist", split=split, data_dir=data_dir, as_supervised=True,
                 batch_size=10_000, download=True)
  images, labels = zip(*tfds.as_numpy(ds))
  images = np.concatenate(images).astype(np.uint8).reshape(-1, 28, 28)
  return Split(images=images, labels=np.concatenate(labels).astype(np.uint8))


# The held-out images are the same for every training seed: drawn with this seed of their own.
VALIDATION_SEED = 20_261_201


def check_hold_out(num_examples: int, n: int) -> None:
  """Raises ValueError unless n images can be held out of num_examples (see hold_out)."""
  if not 0 <= n < num_examples:
    raise ValueError(f"cannot hold out {n:,} of {num_examples:,} training images for validation; "
                     "choose fewer (--validation)")


def hold_out(split: Split, n: int) -> tuple[Split, Split]:
  """(the rest, n held-out images) of a training split; the same n images on every call.

  A fixed shuffle with its own seed rather than the last n rows, so that every class is held out
  in proportion whatever order the files list the images in.

  Raises:
    ValueError: n is negative or leaves no image to train on.
  """
  check_hold_out(len(split), n)
  order = np.random.default_rng(VALIDATION_SEED).permutation(len(split))
  rest, held = np.sort(order[n:]), np.sort(order[:n])
  return (Split(split.images[rest], split.labels[rest]),
          Split(split.images[held], split.labels[held]))
