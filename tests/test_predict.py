import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flaxdigits import bundle
from flaxdigits.calibration import Calibration
from flaxdigits.checkpoint import load_model
from flaxdigits.cli.main import app
from flaxdigits.predict import Predictor, expand_paths

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
  return tiny_checkpoint


@pytest.fixture(scope="module")
def images(small, tmp_path_factory):
  """Three MNIST test digits as dark-on-light PNGs, a blank page, a text file, an empty dir."""
  folder = tmp_path_factory.mktemp("images")
  paths = []
  for i in range(3):
    up = Image.fromarray(255 - small["test"].images[i]).resize((112, 112), Image.BICUBIC)
    up.save(folder / f"digit{i}.png")
    paths.append(str(folder / f"digit{i}.png"))
  Image.new("L", (100, 100), 235).save(folder / "blank.png")
  (folder / "notes.txt").write_text("not an image")
  (folder / "empty").mkdir()
  return folder, paths


def test_predictor_batches_and_keeps_order(checkpoint, images, monkeypatch):
  folder, paths = images
  predictor = Predictor.from_checkpoint(checkpoint)
  calls = []
  real = predictor.probabilities
  monkeypatch.setattr(predictor, "probabilities", lambda x: calls.append(len(x)) or real(x))
  sources = paths + [str(folder / "blank.png"), str(folder / "notes.txt"), str(folder / "none.png")]
  results = predictor.predict(sources)
  assert calls == [3]  # one batched model call for all readable images
  assert [r.source for r in results] == sources
  for r in results[:3]:
    assert r.digit is not None and r.error is None and r.image.shape == (28, 28)
    assert sum(r.probabilities) == pytest.approx(1.0, abs=1e-4)
    assert r.confidence == max(r.probabilities) and r.top_k(2)[0] == (r.digit, r.confidence)
  assert results[3].digit is None and "no digit found" in results[3].error
  assert "not an image" in results[4].error and "no such file" in results[5].error


def test_predictor_accepts_arrays_and_pil_images(checkpoint, small):
  predictor = Predictor.from_checkpoint(checkpoint)
  digit = small["test"].images[0]
  a, b = predictor.predict([digit, Image.fromarray(digit)])
  # Both must succeed: two failures gave digit None == None and approx(None) == None.
  assert a.error is None and b.error is None and a.digit is not None
  assert a.digit == b.digit and a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_probabilities_of_preprocessed_batches_of_any_size(checkpoint, small):
  predictor = Predictor.from_checkpoint(checkpoint)
  images = small["test"].images[:70] / 255.0
  all_at_once = predictor.probabilities(images)
  one_by_one = np.concatenate([predictor.probabilities(images[i:i + 1]) for i in range(5)])
  assert all_at_once.shape == (70, 10)
  np.testing.assert_allclose(all_at_once[:5], one_by_one, atol=1e-5)


def test_bundle_computes_what_the_checkpoint_computes(checkpoint, small):
  """The exported program and the Orbax checkpoint give the same probabilities, any batch."""
  path = bundle.find(checkpoint)
  assert path is not None
  loaded = bundle.load(path)
  model, meta = load_model(checkpoint)
  assert loaded.step == meta["step"] and loaded.model_config == meta["model"]
  images = small["test"].images[:37] / np.float32(255)
  calibration = Calibration.from_dict(meta["calibration"])
  assert loaded.calibration == meta["calibration"] and calibration.temperature != 1
  from_model = Predictor.from_model(model, calibration).probabilities(images)
  np.testing.assert_allclose(np.asarray(loaded.probabilities(images)), from_model, atol=1e-6)
  np.testing.assert_allclose(Predictor.from_checkpoint(checkpoint).probabilities(images),
                             from_model, atol=1e-6)


def test_predict_from_bundle_imports_neither_flax_nor_orbax(checkpoint, images):
  code = ("import sys\nfrom flaxdigits.predict import Predictor\n"
          "[r] = Predictor.from_checkpoint(sys.argv[1]).predict([sys.argv[2]])\n"
          "assert r.digit is not None, r\n"
          "print(sorted(m for m in ('flax', 'orbax.checkpoint') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code, str(checkpoint), images[1][0]],
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("damage", ["stale", "corrupt"])
def test_stale_or_damaged_bundle_falls_back_to_the_checkpoint(checkpoint, small, tmp_path, damage):
  copy = tmp_path / "ckpt"
  shutil.copytree(checkpoint, copy)
  expected = Predictor.from_checkpoint(checkpoint).probabilities(small["test"].images[:3] / 255)
  if damage == "stale":  # a newer step finished after the bundle was written
    latest = max(int(p.name) for p in copy.iterdir() if p.name.isdigit())
    shutil.copytree(copy / str(latest), copy / str(latest + 1))
    assert bundle.find(copy) is None
  else:
    (copy / bundle.BUNDLE_NAME).write_bytes(b"PK\x03\x04 truncated")
    assert bundle.find(copy) is None
  got = Predictor.from_checkpoint(copy).probabilities(small["test"].images[:3] / 255)
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_expand_paths(images):
  folder, paths = images
  assert expand_paths([str(folder)]) == sorted(paths + [str(folder / "blank.png")])
  assert expand_paths([str(folder / "digit*.png")]) == paths
  assert expand_paths([str(folder / "empty"), "nothing*.png"]) == [str(folder / "empty"),
                                                                   "nothing*.png"]


def test_cli_json_reports_each_input_and_fails_if_any_failed(checkpoint, images, tmp_path):
  folder, paths = images
  result = runner.invoke(app, ["predict", "-c", str(checkpoint), "--json", paths[0],
                               str(folder / "blank.png"), str(folder / "empty"),
                               "--save-preprocessed", str(tmp_path / "seen")])
  assert result.exit_code == 1
  out = json.loads(result.stdout)
  assert [o["file"] for o in out] == [paths[0], str(folder / "blank.png"), str(folder / "empty")]
  assert isinstance(out[0]["digit"], int) and len(out[0]["probabilities"]) == 10
  assert out[0]["error"] is None and 0 < out[0]["confidence"] <= 1
  assert out[1]["digit"] is None and "no digit found" in out[1]["error"]
  assert out[2]["digit"] is None and "no images in directory" in out[2]["error"]
  assert "Traceback" not in result.output
  saved = list((tmp_path / "seen").iterdir())
  assert [p.name for p in saved] == ["0000_digit0.png"]
  assert Image.open(saved[0]).size == (28, 28)


def test_cli_table_and_success_exit(checkpoint, images):
  _, paths = images
  result = runner.invoke(app, ["predict", "-c", str(checkpoint), "--top-k", "2"] + paths,
                         env={"COLUMNS": "150"})
  assert result.exit_code == 0, result.output
  assert all(p in result.stdout for p in paths) and "top 2" in result.stdout


def test_cli_missing_checkpoint_is_one_line(images):
  result = runner.invoke(app, ["predict", "-c", "/nonexistent", images[1][0]])
  assert result.exit_code == 1 and "checkpoint directory not found" in result.stderr


def test_the_bundle_is_lowered_for_every_platform(checkpoint):
  import jax
  exported = jax.export.deserialize(bytearray(np.load(bundle.find(checkpoint))["program"]
                                              .tobytes()))
  assert set(exported.platforms) == set(bundle.PLATFORMS)


def test_a_bundle_for_another_platform_falls_back_to_the_checkpoint(checkpoint, tmp_path,
                                                                    monkeypatch):
  from flaxdigits.predict import Predictor
  ckpt = tmp_path / "ckpt"
  shutil.copytree(checkpoint, ckpt)
  model, meta = load_model(ckpt)
  monkeypatch.setattr(bundle, "PLATFORMS", ("cuda",))  # as if trained on a GPU only
  bundle.write(ckpt, model, meta["step"], meta["model"], meta["calibration"])
  monkeypatch.undo()
  with pytest.raises(ValueError, match="exported for cuda, not cpu"):
    bundle.load(bundle.find(ckpt))
  images = np.random.default_rng(0).random((3, 28, 28), np.float32)
  got = Predictor.from_checkpoint(ckpt).probabilities(images)  # the first call does not fail
  calibration = Calibration.from_dict(meta["calibration"])
  np.testing.assert_allclose(got, Predictor.from_model(model, calibration).probabilities(images),
                             atol=1e-6)
