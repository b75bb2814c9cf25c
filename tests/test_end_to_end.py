import json

import pytest
from typer.testing import CliRunner

from flaxdigits.cli.main import app


@pytest.mark.slow
def test_one_epoch_on_real_mnist_through_the_cli(mnist_dir, tmp_path):
  """The default model and recipe, one epoch over all 60,000 images, scored on all 10,000."""
  runner = CliRunner()
  ckpt = tmp_path / "ckpt"
  trained = runner.invoke(app, ["train", "--epochs", "1", "--data-dir", str(mnist_dir),
                                "--checkpoint", str(ckpt), "--json"])
  assert trained.exit_code == 0, trained.output
  assert json.loads(trained.stdout)["step"] == 60_000 // 128
  evaluated = runner.invoke(app, ["eval", "--checkpoint", str(ckpt), "--data-dir",
                                  str(mnist_dir), "--json"])
  assert evaluated.exit_code == 0, evaluated.output
  out = json.loads(evaluated.stdout)
  assert out["num_examples"] == 10_000
  assert out["accuracy"] >= 0.98
