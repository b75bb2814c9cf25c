import flaxdigits


def test_every_public_name_resolves():
  for name in flaxdigits.__all__:
    assert getattr(flaxdigits, name) is not None, name
  assert set(flaxdigits.__all__) <= set(dir(flaxdigits))
