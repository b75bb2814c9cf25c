"""Calibration (temperature, ECE), the reject threshold, and the synthetic outliers."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from flaxdigits import calibration, outliers
from flaxdigits.checkpoint import load_model
from flaxdigits.cli.main import app
from flaxdigits.evaluation import evaluate
from flaxdigits.predict import NOT_A_DIGIT, Predictor

runner = CliRunner()


def overconfident_logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Logits of a classifier that is right 80% of the time and says so with ~99.9% confidence."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  guess = np.where(rng.random(n) < 0.8, labels, rng.integers(0, 10, n))
  logits = rng.normal(0, 1, (n, 10))
  logits[np.arange(n), guess] += 9.0
  return logits, labels


def test_temperature_lowers_nll_on_other_held_out_data():
  fit_logits, fit_labels = overconfident_logits(4000, 0)
  new_logits, new_labels = overconfident_logits(4000, 1)
  t = calibration.fit_temperature(fit_logits, fit_labels)
  assert t > 2  # overconfident: softened
  assert calibration.nll(new_logits, new_labels, t) < 0.6 * calibration.nll(new_logits, new_labels)
  # The minimum: a few per cent either way is worse.
  for off in (0.9, 1.1):
    assert calibration.nll(fit_logits, fit_labels, t) < calibration.nll(fit_logits, fit_labels,
                                                                         t * off)


def test_ece_by_hand():
  # Two bins used: 0.95 confidence with 50% right, 0.65 confidence with 100% right.
  probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.35, 0.65]])
  labels = np.array([0, 1, 1, 1])
  assert calibration.ece(probs, labels) == pytest.approx((2 * 0.45 + 2 * 0.35) / 4)
  rows = calibration.reliability(probs, labels)
  assert sum(r["count"] for r in rows) == 4 and len(rows) == calibration.ECE_BINS


def test_fit_reports_before_and_after():
  logits, labels = overconfident_logits(3000, 2)
  fitted = calibration.fit(logits, labels)
  assert fitted.ece_after < 0.5 * fitted.ece_before and fitted.ece_before > 0.15
  assert fitted.nll_after < fitted.nll_before and fitted.examples == 3000
  assert calibration.Calibration.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted


@pytest.mark.parametrize("n", [50, 1000, 5000])
def test_threshold_keeps_at_least_the_share_asked_with_a_margin(n):
  scores = np.random.default_rng(n).random(n)
  cut = calibration.threshold(scores, 0.99)
  kept = np.mean(scores >= cut)
  assert kept >= 0.99
  assert kept <= 0.99 + 2.5 * np.sqrt(0.99 * 0.01 / n) + 1 / n  # the margin, no more
  # New digits from the same source: at least 99% kept (their sampling noise is what the margin
  # covers; 200,000 of them leave it none).
  assert np.mean(np.random.default_rng(n + 1).random(200_000) >= cut) >= 0.99 - 0.001
  with pytest.raises(ValueError, match="share"):
    calibration.threshold(scores, 0)


def test_rendered_outliers_are_deterministic_and_mnist_shaped(small):
  a = outliers.render(24, 3, small["train"])
  assert a.shape == (24, 28, 28) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, outliers.render(24, 3, small["train"]))
  assert not np.array_equal(a, outliers.render(24, 4, small["train"]))
  assert all(img.max() > 12 for img in a)  # each has ink
  kinds = {outliers.kind_of(i) for i in range(24)}
  assert kinds == set(outliers.KINDS)
  without_digits = outliers.render(8, 3)  # no digits: no halves or pairs
  assert without_digits.shape == (8, 28, 28)


def test_the_cache_returns_what_render_makes(small, tmp_path, monkeypatch):
  monkeypatch.setenv("FLAXDIGITS_OUTLIER_CACHE", str(tmp_path))
  first = outliers.cached(12, 5, small["train"])
  assert len(list(tmp_path.iterdir())) == 1
  np.testing.assert_array_equal(first, outliers.render(12, 5, small["train"]))
  np.testing.assert_array_equal(outliers.cached(12, 5, small["train"]), first)


def test_training_stores_a_calibration_that_the_predictor_uses(tiny_checkpoint, small):
  model, meta = load_model(tiny_checkpoint)
  fitted = calibration.Calibration.from_dict(meta["calibration"])
  assert fitted.examples == 64 and fitted.nll_after <= fitted.nll_before
  assert meta["history"][-1]["temperature"] == fitted.temperature
  predictor = Predictor.from_checkpoint(tiny_checkpoint)
  assert predictor.calibration == fitted and predictor.threshold == fitted.threshold
  images = small["test"].images[:50] / np.float32(255)
  logits = evaluate(model, small["test"]).logits[:50]
  np.testing.assert_allclose(predictor.probabilities(images),
                             calibration.softmax(logits, fitted.temperature), atol=1e-5)


def test_rejection_says_not_a_digit_and_no_reject_restores_the_answer(tiny_checkpoint, small):
  on = Predictor.from_checkpoint(tiny_checkpoint)
  off = Predictor.from_checkpoint(tiny_checkpoint, reject=False)
  images = list(small["test"].images[:40] / np.float32(255))
  images += list(np.random.default_rng(0).random((40, 28, 28)).astype(np.float32))
  without = off.predict(images)
  # A one-epoch model on 448 images is unsure of everything: a threshold at the median score
  # rejects half of these, whatever they are (the real-data tests check what is rejected).
  on.calibration = dataclasses.replace(on.calibration,
                                       threshold=float(np.median([r.score for r in without])))
  with_reject = on.predict(images)
  assert any(r.rejected for r in with_reject)
  for a, b in zip(with_reject, without):
    assert b.digit == int(np.argmax(b.probabilities)) and b.reason is None
    assert b.threshold is None and b.score == pytest.approx(a.score)
    if a.rejected:
      assert a.digit is None and a.reason == NOT_A_DIGIT and a.score < a.threshold
      assert a.confidence == pytest.approx(b.confidence)  # still shown
    else:
      assert a.digit == b.digit and a.score >= a.threshold
    assert a.to_dict()["threshold"] == on.threshold


def test_a_checkpoint_without_calibration_never_rejects(small, tmp_path):
  from flaxdigits.config import ModelConfig, TrainConfig
  from flaxdigits.training import train
  train(small, ModelConfig(conv_features=(8,), dense_features=(16,)),
        TrainConfig(epochs=1, batch_size=64, validation=0, outlier_exposure=0.0),
        checkpoint_dir=str(tmp_path / "c"))
  predictor = Predictor.from_checkpoint(tmp_path / "c")
  assert predictor.calibration is None and predictor.threshold is None
  noise = np.random.default_rng(1).random((5, 28, 28)).astype(np.float32)
  assert all(r.digit is not None for r in predictor.predict(list(noise)))
  _, meta = load_model(tmp_path / "c")
  assert meta["history"][-1]["test_accuracy"] > 0  # scored on test every epoch, as before


def test_old_train_configs_read_as_trained_on_everything():
  from flaxdigits.config import TrainConfig
  old = {k: v for k, v in TrainConfig().to_dict().items()
         if k not in ("validation", "outlier_exposure")}
  config = TrainConfig.from_dict(old)
  assert config.validation == 0 and config.outlier_exposure == 0


def test_cli_eval_reports_calibration(tiny_checkpoint, tiny_data_dir, tmp_path):
  result = runner.invoke(app, ["eval", "-c", str(tiny_checkpoint), "--data-dir",
                               str(tiny_data_dir), "--json", "--report", str(tmp_path)])
  assert result.exit_code == 0, result.output
  out = json.loads(result.stdout)
  _, meta = load_model(tiny_checkpoint)
  assert out["temperature"] == meta["calibration"]["temperature"]
  assert 0 <= out["ece"] <= 1 and out["nll"] > 0 and out["ece_uncalibrated"] >= 0
  assert out["reject"]["threshold"] == meta["calibration"]["threshold"]
  assert 0 <= out["reject"]["kept"] <= 1
  assert (tmp_path / "reliability.png").is_file()
  text = runner.invoke(app, ["eval", "-c", str(tiny_checkpoint), "--data-dir",
                             str(tiny_data_dir)])
  assert text.exit_code == 0 and "calibration (temperature" in text.stdout


def test_cli_predict_no_reject(tiny_checkpoint, tmp_path):
  from PIL import Image
  path = tmp_path / "noise.png"
  Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 60), dtype=np.uint8)).save(path)
  on = runner.invoke(app, ["predict", "-c", str(tiny_checkpoint), "--json", str(path)])
  off = runner.invoke(app, ["predict", "-c", str(tiny_checkpoint), "--json", "--no-reject",
                            str(path)])
  assert on.exit_code == 0 == off.exit_code, on.output + off.output
  a, b = json.loads(on.stdout)[0], json.loads(off.stdout)[0]
  assert b["digit"] == int(np.argmax(b["probabilities"])) and b["threshold"] is None
  assert a["threshold"] is not None and a["score"] == pytest.approx(b["score"])
  assert (a["digit"] is None) == (a["score"] < a["threshold"])
