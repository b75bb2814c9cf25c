import gzip

import numpy as np
import pytest

from conftest import write_idx
from flaxdigits import data

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_shapes_dtypes_and_class_counts(mnist):
  for split, counts in (("train", TRAIN_COUNTS), ("test", TEST_COUNTS)):
    s = mnist[split]
    assert s.images.shape == (sum(counts), 28, 28) and s.images.dtype == np.uint8
    assert s.labels.shape == (sum(counts),) and s.labels.dtype == np.uint8
    assert np.bincount(s.labels, minlength=10).tolist() == counts
  assert mnist["train"].labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_normalize_scales_to_unit_interval_with_channel_dim(small):
  x = data.normalize(small["test"].images)
  assert x.shape == (300, 28, 28, 1) and x.dtype == np.float32
  assert x.min() == 0.0 and x.max() == 1.0
  np.testing.assert_allclose(x[..., 0] * 255, small["test"].images, atol=1e-4)


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"])
@pytest.mark.parametrize("compress", [True, False])
def test_reads_both_namings_raw_or_gzipped(small, tmp_path, name, compress):
  suffix = ".gz" if compress else ""
  write_idx(tmp_path / f"{name}{suffix}", small["test"].images, compress=compress)
  labels_name = name.replace("images", "labels").replace("idx3", "idx1")
  write_idx(tmp_path / f"{labels_name}{suffix}", small["test"].labels, compress=compress)
  loaded = data.load_mnist(tmp_path, ("test",))["test"]
  np.testing.assert_array_equal(loaded.images, small["test"].images)
  np.testing.assert_array_equal(loaded.labels, small["test"].labels)


def test_data_dir_from_environment(small, tiny_data_dir, monkeypatch):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tiny_data_dir))
  assert len(data.load_mnist(splits=("test",))["test"]) == 300


def test_missing_folder_and_file_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    data.load_mnist(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    data.load_mnist(tmp_path)


def test_bad_magic_is_rejected(tmp_path):
  path = write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28), np.uint8), magic=1234)
  with pytest.raises(ValueError, match=r"x.gz: bad magic number 1234"):
    data.read_idx(path, 2051)


def test_truncated_file_is_rejected(tmp_path):
  path = write_idx(tmp_path / "x", np.zeros((3, 28, 28), np.uint8), compress=False)
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(path, 2051)
  gz = tmp_path / "y.gz"
  header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
  gz.write_bytes(gzip.compress(header + bytes(range(256)) * 9)[:-40])  # cut inside the stream
  with pytest.raises(ValueError, match="y.gz: cannot read"):
    data.read_idx(gz, 2051)


def test_idx_size_is_checked_from_the_header_before_inflating(tmp_path):
  # A 2 MB gzip that expands to 2 GB took 4.3 GB before its error; the header says how much
  # data follows, so the reader refuses it, or reads only that much.
  header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2000, 1000, 1000))
  bomb = tmp_path / "bomb-idx3-ubyte.gz"
  bomb.write_bytes(gzip.compress(header + bytes(20_000_000), compresslevel=1))
  assert bomb.stat().st_size < 100_000
  with pytest.raises(ValueError, match=r"declares 2,000,000,000 bytes, more than the "
                                       r"1,073,741,824 this reader accepts"):
    data.read_idx(bomb, 2051)
  small_header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
  long = tmp_path / "long-idx3-ubyte.gz"
  long.write_bytes(gzip.compress(small_header + bytes(20_000_000), compresslevel=1))
  with pytest.raises(ValueError, match=r"2369\+ bytes, but header shape \(3, 28, 28\) needs 2368"):
    data.read_idx(long, 2051)


def test_image_label_count_mismatch_and_bad_shapes(tmp_path):
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros((4,), np.uint8))
  with pytest.raises(ValueError, match="5 images but .* 4 labels"):
    data.load_mnist(tmp_path, ("test",))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full((5,), 12, np.uint8))
  with pytest.raises(ValueError, match="label 12 out of range"):
    data.load_mnist(tmp_path, ("test",))
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 32, 32), np.uint8))
  with pytest.raises(ValueError, match="expected 28x28"):
    data.load_mnist(tmp_path, ("test",))


def test_unknown_split():
  with pytest.raises(ValueError, match="unknown split"):
    data.load_mnist("/tmp", ("validation",))


def test_tfds_path_with_mock_data(monkeypatch, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(data, "_tfds_server_reachable", lambda timeout=3.0: True)
  with tfds.testing.mock_data(num_examples=37):
    split = data.load_mnist(None, ("test",), tfds_data_dir=str(tmp_path))["test"]
  assert split.images.shape == (37, 28, 28) and split.images.dtype == np.uint8
  assert split.labels.shape == (37,) and split.labels.dtype == np.uint8
  assert split.labels.max() <= 9


def test_tfds_without_network_fails_fast_pointing_to_data_dir(monkeypatch, tmp_path, caplog):
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setattr(data, "_tfds_server_reachable", lambda timeout=3.0: False)
  with pytest.raises(FileNotFoundError, match="--data-dir"):
    data.load_mnist(None, ("train",), tfds_data_dir=str(tmp_path))
  # TFDS's "Variant folder ... has no dataset_info.json" reached the user before this error.
  assert not [r for r in caplog.records if "dataset_info" in r.getMessage()]
