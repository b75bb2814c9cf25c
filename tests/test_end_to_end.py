import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flaxdigits.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_realistic_set  # noqa: E402

# Every test here that uses the one-epoch real-MNIST checkpoint runs on one xdist worker, which
# trains it once.
pytestmark = pytest.mark.xdist_group("real_checkpoint")

runner = CliRunner()
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
def test_one_epoch_on_real_mnist_scores_all_10000(real_checkpoint, mnist_args, tmp_path):
  evaluated = runner.invoke(app, ["eval", "--checkpoint", str(real_checkpoint), *mnist_args,
                                  "--json", "--report", str(tmp_path)])
  assert evaluated.exit_code == 0, evaluated.output
  out = json.loads(evaluated.stdout)
  cm = np.array(out["confusion_matrix"])
  assert out["num_examples"] == 10_000 == cm.sum()
  assert out["accuracy"] >= 0.98
  assert [r["support"] for r in out["per_class"]] == TEST_COUNTS == cm.sum(1).tolist()
  for r in out["per_class"]:
    k = r["digit"]
    assert r["precision"] == pytest.approx(cm[k, k] / cm[:, k].sum())
    assert r["recall"] == pytest.approx(cm[k, k] / cm[k].sum())
  assert sum(p["count"] for p in out["most_confused"]) <= 10_000 - np.trace(cm)


@pytest.mark.slow
def test_predict_recognises_realistic_renderings(real_checkpoint, mnist, tmp_path):
  """MNIST test digits rendered as photos, canvas exports, chalk, thick and thin pens."""
  rng = np.random.default_rng(0)
  test = mnist["test"]
  paths, labels = [], []
  for kind in make_realistic_set.KINDS:
    for index in rng.choice(len(test), 25, replace=False):
      image, ext = make_realistic_set.render(kind, test.images[index] / 255.0, rng)
      path = tmp_path / f"{kind}_{index}.{ext}"
      image.save(path)
      paths.append(str(path))
      labels.append(int(test.labels[index]))
  result = runner.invoke(app, ["predict", "-c", str(real_checkpoint), "--json", *paths])
  assert result.exit_code == 0, result.output
  predicted = [o["digit"] for o in json.loads(result.stdout)]
  accuracy = np.mean(np.array(predicted) == np.array(labels))
  assert accuracy >= 0.95, accuracy
