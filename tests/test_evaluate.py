import jax
import numpy as np
import pytest
from flax import nnx

from flaxdigits import evaluation
from flaxdigits.config import ModelConfig
from flaxdigits.data import Split, normalize
from flaxdigits.augment import rotate, shift_image
from flaxdigits.evaluation import (TTA_SHIFTS, EvalResult, _eval_batch, cross_entropy, evaluate,
                                 tta_views)
from flaxdigits.model import build_model
from flaxdigits.parallel import batch_sharded, make_mesh, replicate


@pytest.mark.parametrize("n, batch_size, n_devices",
                         [(300, 64, 4), (300, 300, 1), (7, 1000, 4), (300, 4, 4)])
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
  np.testing.assert_array_equal(result.predicted, predicted)
  probabilities = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(result.confidence, probabilities.max(-1), rtol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_sharded_evaluation_program_has_no_cross_device_communication(tta):
  # XLA:CPU's all-reduce can deadlock when many programs without a data dependency between
  # them are queued (`digits eval --batch-size 32` on two CPU devices aborted the process in 2
  # of 3 runs): evaluation's batches are such programs, so each returns per-example outputs.
  model = build_model(ModelConfig(conv_features=(8,), dense_features=(16,)), seed=3)
  mesh = make_mesh(jax.devices()[:4])
  graphdef, params = nnx.split(model)
  images, labels, params = replicate(
      (np.zeros((32, 28, 28), np.uint8), np.zeros(32, np.int32), params), mesh)
  program = _eval_batch.lower(graphdef, params, images, labels, sharding=batch_sharded(mesh),
                              tta=tta).compile()
  for sharding in program.output_shardings:  # really split over the four devices
    assert sharding.is_equivalent_to(batch_sharded(mesh), 1)
  hlo = program.as_text()
  for collective in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                     "collective-permute"):
    assert collective not in hlo


def test_per_class_metrics_agree_with_the_predictions(small):
  model = build_model(ModelConfig(conv_features=(8,), dense_features=(16,)), seed=1)
  split = small["test"]
  result = evaluate(model, split)
  labels, predicted = split.labels, result.predicted
  rows = result.per_class()
  assert [r["digit"] for r in rows] == list(range(10))
  assert sum(r["support"] for r in rows) == len(split)
  for k, r in enumerate(rows):
    hits = np.sum((predicted == k) & (labels == k))
    precision = hits / max(np.sum(predicted == k), 1)
    recall = hits / np.sum(labels == k)
    assert r["support"] == np.sum(labels == k)
    assert r["precision"] == pytest.approx(precision) and r["recall"] == pytest.approx(recall)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert r["f1"] == pytest.approx(f1)


def test_most_confused_pairs_are_the_largest_off_diagonal_cells():
  cm = np.diag(np.full(10, 50))
  cm[9, 4], cm[4, 9], cm[3, 5], cm[7, 1] = 6, 2, 4, 4
  result = EvalResult(accuracy=0.9, loss=0.1, num_examples=int(cm.sum()), confusion_matrix=cm,
                      predicted=np.zeros(0, int), confidence=np.zeros(0),
                      logits=np.zeros((0, 10)))
  assert result.most_confused(3) == [{"true": 9, "predicted": 4, "count": 6},
                                     {"true": 3, "predicted": 5, "count": 4},
                                     {"true": 7, "predicted": 1, "count": 4}]
  assert len(result.most_confused(100)) == 4  # zero cells are not pairs
  rows = result.per_class()
  assert rows[4]["recall"] == pytest.approx(50 / 52)
  assert rows[4]["precision"] == pytest.approx(50 / 56)
  assert rows[0] == {"digit": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 50}


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


@pytest.mark.parametrize("batch_size", [0, -5])
def test_batch_size_below_one_is_an_error(small, batch_size):
  model = build_model(ModelConfig(conv_features=(4,), dense_features=(4,)))
  with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {batch_size}"):
    evaluate(model, small["test"], batch_size=batch_size)


def test_shift_image_moves_pixels_and_fills_with_background():
  image = np.zeros((1, 5, 5, 1), np.float32)
  image[0, 2, 3, 0] = 1.0
  for dy, dx in TTA_SHIFTS:
    moved = np.asarray(shift_image(image, dy, dx))
    assert moved[0, 2 + dy, 3 + dx, 0] == 1.0 and moved.sum() == 1.0
  edge = np.zeros((1, 5, 5, 1), np.float32)
  edge[0, 0, 0, 0] = 1.0
  assert np.asarray(shift_image(edge, -1, 0)).sum() == 0.0  # shifted out, not wrapped


def test_rotate_turns_about_the_centre():
  image = np.zeros((1, 28, 28, 1), np.float32)
  image[0, 5, 13, 0] = 1.0
  np.testing.assert_allclose(rotate(image, 0.0), image, atol=1e-6)
  quarter = np.asarray(rotate(image, np.pi / 2))  # output (y, x) samples input (27 - x, y)
  assert quarter[0, 13, 22, 0] == pytest.approx(1.0, abs=1e-5)
  assert quarter.sum() == pytest.approx(1.0, abs=1e-5)
  back = np.asarray(rotate(rotate(image, 0.1), -0.1))
  assert np.unravel_index(back.argmax(), back.shape) == (0, 5, 13, 0)


def test_tta_views_are_the_batch_its_shifts_and_rotations(monkeypatch):
  images = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
  views = tta_views(images)
  assert len(views) == 5 and len(set(TTA_SHIFTS)) == 5  # chosen on held-out images
  np.testing.assert_array_equal(views[0], images)
  np.testing.assert_array_equal(views[1], shift_image(images, -1, 0))
  np.testing.assert_array_equal(views[-1], shift_image(images, 0, 1))
  monkeypatch.setattr(evaluation, "TTA_ROTATIONS", (-0.1, 0.1))  # rotations, when asked for
  views = tta_views(images)
  assert len(views) == 7
  np.testing.assert_array_equal(views[-1], rotate(images, 0.1))


def test_tta_averages_probabilities_over_the_shifted_views(small):
  test = small["test"]
  model = build_model(ModelConfig(), seed=4)
  result = evaluate(model, test, batch_size=64, tta=True, mesh=make_mesh(jax.devices()[:1]))
  images = normalize(test.images)
  probs = np.mean([jax.nn.softmax(model(view), -1) for view in tta_views(images)], axis=0)
  np.testing.assert_array_equal(result.predicted, probs.argmax(-1))
  np.testing.assert_allclose(result.confidence, probs.max(-1), rtol=1e-5)
  labels = test.labels.astype(int)
  assert result.loss == pytest.approx(-np.mean(np.log(probs[np.arange(len(labels)), labels])),
                                      rel=1e-4)
  plain = evaluate(model, test, batch_size=64, mesh=make_mesh(jax.devices()[:1]))
  assert not np.allclose(plain.confidence, result.confidence)


def test_a_second_model_of_the_same_config_does_not_compile_again(small):
  # The pooling function was a per-instance functools.partial in the (static) graphdef: every
  # loaded model compiled the evaluation again and stayed in jit's cache.
  config = ModelConfig(conv_features=(4,), dense_features=(8,))
  split = Split(small["test"].images[:50], small["test"].labels[:50])
  evaluate(build_model(config, seed=0), split, batch_size=50)
  compiled = _eval_batch._cache_size()
  other = evaluate(build_model(config, seed=1), split, batch_size=50)
  assert _eval_batch._cache_size() == compiled
  assert other.num_examples == 50


def test_splits_of_any_length_share_one_program(small):
  # Training scores its held-out images, then the test set: one compilation for both.
  model = build_model(ModelConfig(conv_features=(4,), dense_features=(8,)), seed=0)
  images, labels = small["test"].images, small["test"].labels
  first = evaluate(model, Split(images[:40], labels[:40]), batch_size=20)
  compiled = _eval_batch._cache_size()
  longer = evaluate(model, Split(images[:100], labels[:100]), batch_size=20)
  assert _eval_batch._cache_size() == compiled
  np.testing.assert_array_equal(longer.predicted[:40], first.predicted)
  assert longer.num_examples == 100

