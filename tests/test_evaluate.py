import jax
import numpy as np
import pytest

from flaxdigits.config import ModelConfig
from flaxdigits.data import Split, normalize
from flaxdigits.evaluate import cross_entropy, evaluate
from flaxdigits.model import build_model
from flaxdigits.parallel import make_mesh


@pytest.mark.parametrize("n, batch_size, n_devices", [(300, 64, 4), (300, 300, 1), (7, 1000, 4)])
def test_every_example_scored_exactly_once(small, n, batch_size, n_devices):
  model = build_model(ModelConfig(conv_features=(8,), dense_features=(16,)), seed=3)
  split = Split(small["test"].images[:n], small["test"].labels[:n])
  result = evaluate(model, split, batch_size=batch_size, mesh=make_mesh(jax.devices()[:n_devices]))
  logits = np.asarray(model(normalize(split.images)))
  predicted = logits.argmax(-1)
  assert result.num_examples == n == result.confusion_matrix.sum()
  assert result.accuracy == pytest.approx(np.mean(predicted == split.labels), abs=1e-9)
  np.testing.assert_allclose(result.loss, np.mean(cross_entropy(logits, split.labels)),
                             rtol=1e-5)
  expected = np.zeros((10, 10), int)
  np.add.at(expected, (split.labels, predicted), 1)
  np.testing.assert_array_equal(result.confusion_matrix, expected)


def test_cross_entropy_with_label_smoothing():
  logits = np.array([[2.0, 0.0, -1.0]], np.float32)
  p = np.exp(logits) / np.exp(logits).sum()
  np.testing.assert_allclose(cross_entropy(logits, np.array([0])), -np.log(p[0, 0]), rtol=1e-6)
  smooth = cross_entropy(logits, np.array([0]), 0.3)
  target = np.array([0.7 + 0.1, 0.1, 0.1])
  np.testing.assert_allclose(smooth, -(target * np.log(p[0])).sum(), rtol=1e-6)


def test_empty_split_is_an_error():
  model = build_model(ModelConfig(conv_features=(4,), dense_features=(4,)))
  with pytest.raises(ValueError, match="empty"):
    evaluate(model, Split(np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8)))
