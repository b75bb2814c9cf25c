import json

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from flaxdigits import export
from flaxdigits.checkpoint import load_model
from flaxdigits.cli.main import app
from flaxdigits.data import normalize

# Every test here that uses the one-epoch real-MNIST checkpoint runs on one xdist worker, which
# trains it once.
pytestmark = pytest.mark.xdist_group("real_checkpoint")

pytest.importorskip("jax2onnx", reason="needs the export extra: pip install '.[export]'")
pytest.importorskip("ai_edge_litert", reason="needs the export extra: pip install '.[export]'")

runner = CliRunner()


@pytest.fixture(scope="module")
def reference(real_checkpoint, mnist):
  """The JAX model's probabilities on all 10,000 real MNIST test images."""
  model, meta = load_model(real_checkpoint)
  images = normalize(mnist["test"].images)
  fn = jax.jit(export.probabilities_fn(model, meta["calibration"]["temperature"]))
  expected = np.concatenate([np.asarray(fn(images[i:i + 1000])) for i in range(0, 10_000, 1000)])
  return model, meta, images, expected


@pytest.mark.slow
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_matches_jax_on_all_test_images(reference, fmt, tmp_path):
  model, meta, images, expected = reference
  result = export.export(model, meta, fmt, tmp_path / f"digits.{fmt}")
  assert result.size_bytes > 3_000_000  # the weights travel inside the one file
  got = np.concatenate([export.run(result.path, images[i:i + 1000])
                        for i in range(0, 10_000, 1000)])
  assert got.shape == (10_000, 10)
  agreement = np.mean(got.argmax(-1) == expected.argmax(-1))
  assert agreement >= 0.9999, agreement
  assert np.abs(got - expected).max() <= 1e-5  # the same calibrated probabilities
  for n in (1, 7):  # the batch dimension is dynamic
    np.testing.assert_allclose(export.run(result.path, images[:n]), expected[:n], atol=1e-5)
  sidecar = json.loads(result.sidecar.read_text())
  assert sidecar["input"]["shape"] == ["N", 28, 28, 1] and sidecar["input"]["range"] == [0, 1]
  assert sidecar["output"]["name"] == "probabilities" and sidecar["classes"][3] == "3"
  assert sidecar["source"]["step"] == meta["step"] and sidecar["file"] == f"digits.{fmt}"
  assert sidecar["output"]["calibrated"] is True
  assert sidecar["calibration"]["temperature"] == meta["calibration"]["temperature"]
  assert sidecar["reject"]["threshold"] == meta["calibration"]["threshold"]


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_batch_norm_exports_with_its_running_averages(fmt, small, tmp_path):
  from flaxdigits.config import ModelConfig
  from flaxdigits.model import build_model
  # Dropout too: inactive in inference, it must not reach the exporter at all.
  config = ModelConfig(conv_features=(8, 16), dense_features=(32,), norm="batch", dropout=0.3)
  model = build_model(config, seed=0)
  images = normalize(small["test"].images[:64])
  for _ in range(5):  # running averages well away from their initial 0 / 1
    model(images, train=True)
  expected = np.asarray(jax.jit(export.probabilities_fn(model))(images))
  untrained = build_model(config, seed=0)
  assert np.abs(np.asarray(export.probabilities_fn(untrained)(images)) - expected).max() > 1e-2
  result = export.export(model, {"model": config.to_dict(), "step": 5}, fmt,
                         tmp_path / f"bn.{fmt}")
  np.testing.assert_allclose(export.run(result.path, images), expected, atol=1e-4)


def test_refuses_to_overwrite_and_unknown_formats(tiny_checkpoint, tmp_path):
  model, meta = load_model(tiny_checkpoint)
  (tmp_path / "digits.onnx").write_bytes(b"someone's file")
  with pytest.raises(ValueError, match=r"exists; pass overwrite=True \(--force\)"):
    export.export(model, meta, "onnx", tmp_path / "digits.onnx")
  assert (tmp_path / "digits.onnx").read_bytes() == b"someone's file"
  with pytest.raises(ValueError, match="unknown export format 'pdf'"):
    export.export(model, meta, "pdf", tmp_path / "digits.pdf")


def test_cli_export_json_and_errors(tiny_checkpoint, tmp_path):
  out = tmp_path / "phone" / "model.onnx"
  result = runner.invoke(app, ["export", "-c", str(tiny_checkpoint), "--format", "onnx", "--out",
                               str(out), "--json"])
  assert result.exit_code == 0, result.output
  reported = json.loads(result.stdout)
  assert reported["file"] == str(out) and reported["max_abs_diff"] <= 1e-4
  assert out.is_file() and (tmp_path / "phone" / "model.onnx.json").is_file()
  again = runner.invoke(app, ["export", "-c", str(tiny_checkpoint), "-f", "onnx", "--out",
                              str(out)])
  assert again.exit_code == 1 and "(--force) to replace it" in again.stderr
  missing = runner.invoke(app, ["export", "-c", str(tmp_path / "none"), "-f", "tflite"])
  assert missing.exit_code == 1 and "checkpoint directory not found" in missing.stderr
  assert "Traceback" not in again.output + missing.output


def test_an_export_that_fails_its_check_leaves_nothing_behind(tiny_checkpoint, tmp_path,
                                                               monkeypatch):
  # The file and sidecar were written under their final names before the check, so a bad
  # export stayed there and a retry without --force was refused as "exists".
  model, meta = load_model(tiny_checkpoint)
  monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no export can pass
  with pytest.raises(ValueError, match="disagrees with the JAX model .* nothing was written"):
    export.export(model, meta, "onnx", tmp_path / "digits.onnx")
  assert list(tmp_path.iterdir()) == []
  monkeypatch.undo()
  result = export.export(model, meta, "onnx", tmp_path / "digits.onnx")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx", "digits.onnx.json"]
  assert result.max_abs_diff <= export.TOLERANCE

