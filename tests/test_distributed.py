"""Joining a job: what one process does, and settings refused before JAX is touched."""

import sys

import numpy as np
import pytest

from flaxdigits import distributed, launch


def test_one_process_stays_one_process(monkeypatch):
  monkeypatch.setattr(distributed, "cluster_detected", lambda: None)
  assert distributed.initialize() == distributed.Job()
  assert distributed.initialize("127.0.0.1:1234", 1, 0) == distributed.Job()
  assert distributed.is_primary()
  assert distributed.any_process(True) and not distributed.any_process(False)


@pytest.mark.parametrize("settings, match", [
    (("127.0.0.1:1234", 2, None), "missing --process-id"),
    ((None, 2, 0), "missing --coordinator"),
    (("127.0.0.1:1234", 0, 0), "--num-processes must be >= 1"),
    (("127.0.0.1:1234", 2, 2), r"--process-id must be in \[0, 1\]"),
    (("127.0.0.1", 2, 0), "HOST:PORT"),
    (("127.0.0.1:99999", 2, 0), "HOST:PORT"),
])
def test_bad_settings_are_refused(settings, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(*settings)


def test_gather_rows_in_one_process_concatenates():
  import jax.numpy as jnp
  whole, = distributed.gather_rows([[jnp.arange(3), jnp.arange(3, 5)]])
  np.testing.assert_array_equal(whole, np.arange(5))


def test_local_batch_of_one_process_is_all_of_it():
  import jax

  from flaxdigits import parallel
  mesh = parallel.make_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
  assert distributed.local_batch(sharding, (3, 8 * mesh.size), axis=1) == slice(0, 8 * mesh.size)


def test_the_launcher_names_the_process_that_failed():
  started = []
  outcome = launch.run(["no-such-command"], 2, on_start=lambda i, pid: started.append(i))
  assert started == [0, 1]
  assert outcome.returncode == 2 and outcome.failed in (0, 1)
  assert outcome.reason == "exited with code 2"
  assert launch.describe(-9) == "was killed by SIGKILL"


def test_a_process_killed_by_a_signal_is_named_before_the_peers_it_made_fail():
  assert launch.first_failure([None, None]) is None
  assert launch.first_failure([0, None]) is None
  assert launch.first_failure([None, 1, 2]) == 1
  assert launch.first_failure([1, -9]) == 1  # both seen in one poll: the kill is the cause
  assert launch.first_failure([130, None], interrupted=True) is None
  assert launch.first_failure([130, None]) == 0


def test_train_refuses_part_of_a_job_in_one_line(tmp_path):
  from typer.testing import CliRunner

  from flaxdigits.cli.main import app
  result = CliRunner().invoke(app, ["train", "-c", str(tmp_path / "c"), "--coordinator",
                                    "127.0.0.1:1234", "--num-processes", "2"],
                              env={"JOB_COMPLETION_INDEX": None})
  assert result.exit_code == 1
  assert "missing --process-id" in result.output and "Traceback" not in result.output


def test_launch_needs_a_command():
  from typer.testing import CliRunner

  from flaxdigits.cli.main import app
  result = CliRunner().invoke(app, ["launch", "-n", "2"])
  assert result.exit_code == 2 and "name the command to run" in result.output
