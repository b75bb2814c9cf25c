import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from flaxdigits import eda, figures
from flaxdigits.cli.main import app
from flaxdigits.data import Split

runner = CliRunner()
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_counts_and_pixel_statistics(mnist):
  train, test = eda.summarize(mnist["train"], "train"), eda.summarize(mnist["test"], "test")
  assert train.class_counts == TRAIN_COUNTS and train.num_examples == 60_000
  assert test.class_counts == TEST_COUNTS and test.num_examples == 10_000
  assert train.pixel_mean == pytest.approx(0.1307, abs=5e-5)  # the figures people normalise with
  assert train.pixel_std == pytest.approx(0.3081, abs=5e-5)
  assert train.imbalance_ratio == pytest.approx(6742 / 5421) and train.balanced
  assert sum(train.pixel_histogram) == 60_000 * 28 * 28


def test_summary_matches_direct_computation():
  rng = np.random.default_rng(0)
  labels = rng.choice(10, 500, p=[0.3] + [0.7 / 9] * 9).astype(np.uint8)
  images = rng.integers(0, 256, (500, 28, 28), dtype=np.uint8)
  s = eda.summarize(Split(images, labels), "x")
  reference = stats.chisquare(np.bincount(labels, minlength=10))
  assert s.chi2 == pytest.approx(reference.statistic)
  assert s.chi2_p_value == pytest.approx(reference.pvalue, rel=1e-6)
  assert s.pixel_mean == pytest.approx((images / 255.0).mean())
  assert s.pixel_std == pytest.approx((images / 255.0).std())
  assert not s.balanced and s.to_dict()["class_counts"] == np.bincount(labels).tolist()


def test_empty_split_is_an_error():
  with pytest.raises(ValueError, match="empty"):
    eda.summarize(Split(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8)), "train")


def test_samples_and_class_means(small):
  split = Split(small["test"].images[:40], small["test"].labels[:40])
  chosen = eda.samples(split, per_class=6)
  assert chosen.shape == (10, 6)
  for k in range(10):
    picked = chosen[k][chosen[k] >= 0]
    assert (split.labels[picked] == k).all()
    assert len(picked) == min(6, np.sum(split.labels == k))  # -1 pads a short class
  means = eda.class_means(split)
  np.testing.assert_allclose(means[3], split.images[split.labels == 3].mean(0) / 255.0)


def test_figures_are_pngs_of_their_stated_size(small, tmp_path):
  summaries = [eda.summarize(small[s], s) for s in ("train", "test")]
  made = figures.eda_figures(small, summaries)
  assert set(made) == {"class_distribution", "pixel_histogram", "samples_train", "samples_test",
                       "mean_images_train", "mean_images_test"}
  for path in figures.save_all(made, tmp_path):
    width, height = made[path.stem].get_size_inches() * figures.DPI
    with Image.open(path) as image:
      assert image.format == "PNG" and image.size == (round(width), round(height))
      assert np.asarray(image.convert("L")).std() > 10  # something is drawn


def test_cli_eda_json_and_figures(tiny_data_dir, small, tmp_path):
  result = runner.invoke(app, ["eda", "--data-dir", str(tiny_data_dir), "--split", "test",
                               "--out", str(tmp_path / "eda"), "--json"])
  assert result.exit_code == 0, result.output
  out = json.loads(result.stdout)
  assert list(out["splits"]) == ["test"]
  test = out["splits"]["test"]
  assert test["class_counts"] == np.bincount(small["test"].labels, minlength=10).tolist()
  assert test["num_examples"] == 300 and {"chi2", "pixel_mean", "pixel_std"} <= set(test)
  assert sorted(p.name for p in (tmp_path / "eda").iterdir()) == sorted(
      ["class_distribution.png", "pixel_histogram.png", "samples_test.png",
       "mean_images_test.png"])


@pytest.mark.slow  # a whole digits process
def test_cli_eda_table_and_no_tensorflow(tiny_data_dir, tmp_path):
  code = ("import sys\nfrom typer.testing import CliRunner\nfrom flaxdigits.cli.main import app\n"
          "r = CliRunner().invoke(app, ['eda', '--data-dir', sys.argv[1], '--out', sys.argv[2]],"
          " env={'COLUMNS': '120'})\n"
          "assert r.exit_code == 0, r.output\nprint(r.stdout)\n"
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'jax') if m in sys.modules]\n"
          "assert not bad, bad\n")
  out = subprocess.run([sys.executable, "-c", code, str(tiny_data_dir), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "Class balance" in out.stdout and "train count" in out.stdout
  assert "chi-square" in out.stdout and "pixels scaled to [0, 1]" in out.stdout


def test_cli_eda_missing_data_is_one_line(tmp_path):
  result = runner.invoke(app, ["eda", "--data-dir", str(tmp_path / "none")])
  assert result.exit_code == 1 and "Traceback" not in result.output
  assert len(result.stderr.strip().splitlines()) == 1
