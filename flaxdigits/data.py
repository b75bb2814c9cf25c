"""MNIST as uint8 numpy arrays: from local IDX files or through tensorflow-datasets."""

from __future__ import annotations

import dataclasses
import gzip
import os
import socket
from pathlib import Path

import numpy as np

DATA_DIR_ENV = "FLAXDIGITS_DATA_DIR"
SPLITS = ("train", "test")
NUM_CLASSES = 10
# MNIST's published counts. Files in the same format with other counts are accepted.
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_IDX_STEMS = {
    ("train", "images"): "train-images",
    ("train", "labels"): "train-labels",
    ("test", "images"): "t10k-images",
    ("test", "labels"): "t10k-labels",
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
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


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
  """Reads one IDX file (gzipped or raw) into a uint8 array, validating its header and size."""
  path = Path(path)
  try:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise ValueError(f"{path}: cannot read ({e})") from None
  if len(raw) < 4:
    raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    raise ValueError(f"{path}: bad magic number {magic}, expected {expected_magic}")
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path}: truncated header")
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  expected = header + int(np.prod(shape))
  if len(raw) != expected:
    raise ValueError(f"{path}: {len(raw)} bytes, but header shape {shape} needs {expected} "
                     "(truncated or corrupt)")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_idx_split(data_dir: str | os.PathLike, split: str) -> Split:
  images_path = find_idx_file(data_dir, split, "images")
  labels_path = find_idx_file(data_dir, split, "labels")
  images = read_idx(images_path, _IMAGES_MAGIC)
  labels = read_idx(labels_path, _LABELS_MAGIC)
  if images.shape[1:] != (28, 28):
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


def _import_tfds():
  """Imports TFDS with TensorFlow kept off any GPU, which belongs to JAX."""
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
  builder = tfds.builder("mnist", data_dir=data_dir)
  if not builder.is_prepared() and not _tfds_server_reachable():
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
