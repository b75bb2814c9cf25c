import importlib

import flaxdigits


def test_every_public_name_resolves():
  for name in flaxdigits.__all__:
    assert getattr(flaxdigits, name) is not None, name
  assert set(flaxdigits.__all__) <= set(dir(flaxdigits))


def test_public_names_stay_what_they_name_after_every_module_is_imported():
  # Importing a submodule binds it as an attribute of the package: a submodule named like a
  # public function (flaxdigits.train, once) turned fd.train into the module after first use.
  modules = {importlib.import_module(path) for path in flaxdigits._EXPORTS.values()}
  for name, path in flaxdigits._EXPORTS.items():
    assert getattr(flaxdigits, name) is getattr(importlib.import_module(path), name), name
  assert callable(flaxdigits.train) and callable(flaxdigits.evaluate)
  assert not {m.__name__.rpartition(".")[2] for m in modules} & set(flaxdigits.__all__)
