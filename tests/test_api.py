import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flaxdigits


def test_every_public_name_resolves():
  for name in flaxdigits.__all__:
    assert getattr(flaxdigits, name) is not None, name
  assert set(flaxdigits.__all__) <= set(dir(flaxdigits))


def test_public_names_stay_what_they_name_after_every_module_is_imported():
  # Importing a submodule binds it as an attribute of the package: a submodule named like a
  # public function (flaxdigits.train, once) turned fd.train into the module after first use.
  modules = {importlib.import_module(path.partition(":")[0])
             for path in flaxdigits._EXPORTS.values()}
  for name, path in flaxdigits._EXPORTS.items():
    module, _, attribute = path.partition(":")
    assert getattr(flaxdigits, name) is getattr(importlib.import_module(module),
                                                attribute or name), name
  assert callable(flaxdigits.train) and callable(flaxdigits.evaluate)
  assert not {m.__name__.rpartition(".")[2] for m in modules} & set(flaxdigits.__all__)


@pytest.mark.slow  # trains, exports and serves: everything the README's block does
def test_the_readme_api_example_runs(tiny_data_dir, tmp_path, monkeypatch):
  # The README's Python API block, as written, on the small data set and for one epoch.
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  start = readme.index("```python", readme.index("## Python API")) + len("```python")
  code = readme[start:readme.index("```", start)]
  assert "epochs=5" in code and '"../shared/data/mnist"' in code
  code = code.replace("epochs=5", "epochs=1, validation=64").replace(
      '"../shared/data/mnist"', repr(str(tiny_data_dir)))  # 512 images: hold out fewer
  monkeypatch.chdir(tmp_path)
  image = Image.fromarray(255 - _digit_seven(), "L").resize((140, 140))  # dark ink on paper
  image.save("photo.jpg")
  namespace = {"pil_image": image, "numpy_array": np.asarray(image)}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert [p.error for p in namespace["predictor"].predict(["photo.jpg"])] == [None]
  assert 0 <= namespace["report"].accuracy <= 1
  assert {p.name for p in (tmp_path / "report").iterdir()} >= {"confusion_matrix.png",
                                                               "misclassified.png"}
  assert (tmp_path / "eda" / "samples_train.png").is_file()
  assert (tmp_path / "digits.onnx").is_file() and (tmp_path / "digits.onnx.json").is_file()
  assert callable(namespace["app"])


def _digit_seven() -> np.ndarray:
  seven = np.zeros((28, 28), np.uint8)
  seven[6:9, 7:21] = 255
  for row in range(9, 23):
    seven[row, 19 - (row - 9) // 2: 22 - (row - 9) // 2] = 255
  return seven
