import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxdigits.config import ModelConfig, TrainConfig
from flaxdigits.model import build_model, count_params, pool2x2


def test_default_model_is_the_flax_example_cnn():
  model = build_model(ModelConfig())
  # conv 3x3x1x32 + conv 3x3x32x64 + dense 3136x256 + dense 256x10, with biases.
  assert count_params(model) == (9 * 32 + 32) + (9 * 32 * 64 + 64) + (3136 * 256 + 256) + (
      256 * 10 + 10)
  assert model(jnp.zeros((3, 28, 28, 1))).shape == (3, 10)


@pytest.mark.parametrize("convs", [(8,), (8, 16), (8, 16, 32)])
def test_depth_and_widths_follow_config(convs):
  model = build_model(ModelConfig(conv_features=convs, dense_features=(20, 12), pool="max"))
  assert model(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
  assert len(model.convs) == len(convs) and len(model.denses) == 2


def test_deeper_blocks_stack_convs_of_the_block_width_before_each_pool():
  config = ModelConfig(conv_features=(8, 16), dense_features=(12,), norm="batch",
                       conv_depths=(1, 2))
  model = build_model(config)
  assert [c.kernel.shape for c in model.convs] == [(3, 3, 1, 8), (3, 3, 8, 16), (3, 3, 16, 16)]
  assert [n.scale.shape for n in model.norms] == [(8,), (16,), (16,)]
  assert model(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
  # One conv per block, said or not, is the same model with the same parameters.
  shallow, said = (nnx.state(build_model(ModelConfig(conv_features=(8, 16), conv_depths=d)))
                   for d in ((), (1, 1)))
  assert jax.tree.all(jax.tree.map(jnp.array_equal, shallow, said))


@pytest.mark.parametrize("depths", [(2,), (1, 4), (0, 1)])
def test_conv_depths_must_give_each_block_one_to_three_convs(depths):
  with pytest.raises(ValueError, match="conv_depths"):
    ModelConfig(conv_features=(8, 16), conv_depths=depths)


def test_same_seed_same_parameters_other_seed_differs():
  a, b, c = (build_model(ModelConfig(), seed=s) for s in (0, 0, 1))
  assert jnp.array_equal(a.convs[0].kernel[...], b.convs[0].kernel[...])
  assert not jnp.array_equal(a.convs[0].kernel[...], c.convs[0].kernel[...])
  a.convs[0].kernel[...] = jnp.zeros_like(a.convs[0].kernel[...])  # models share no state
  assert jnp.any(b.convs[0].kernel[...] != 0)


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(conv_features=(8, 16, 32),
                                                              pool="max")])
def test_compiled_initialisation_gives_the_eager_parameters(config):
  """The same random draws as NNX's eager initialisers; unoptimised compilation may round a
  truncated-normal draw differently in the last bit."""
  from flaxdigits.model import CNN
  eager = nnx.state(CNN(config, rngs=nnx.Rngs(params=3)), nnx.Param)
  built = nnx.state(build_model(config, seed=3), nnx.Param)
  assert jax.tree.structure(eager) == jax.tree.structure(built)
  for want, got in zip(jax.tree.leaves(eager), jax.tree.leaves(built)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_dropout_only_with_a_key_and_only_on_the_dense_inputs():
  config = ModelConfig(conv_features=(8,), dense_features=(16,), dropout=0.5)
  model = build_model(config, seed=0)
  x = jax.random.uniform(jax.random.key(0), (64, 28, 28, 1))
  plain = model(x)
  np.testing.assert_array_equal(model(x), plain)  # no key: deterministic, as inference runs
  a, b = (model(x, dropout_key=jax.random.key(k)) for k in (1, 2))
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  np.testing.assert_array_equal(model(x, dropout_key=jax.random.key(1)), a)
  # Same parameters without dropout in the config: the key changes nothing.
  undropped = nnx.merge(nnx.graphdef(build_model(ModelConfig(conv_features=(8,),
                                                             dense_features=(16,)))),
                        nnx.state(model))
  np.testing.assert_array_equal(undropped(x, dropout_key=jax.random.key(1)), plain)
  # Inverted dropout keeps the expected input: with the linear head alone after it, the logits
  # averaged over many masks approach the plain ones.
  linear = build_model(ModelConfig(conv_features=(8,), dense_features=(), dropout=0.5), seed=0)
  keys = jax.random.split(jax.random.key(3), 4000)
  many = jax.vmap(lambda k: linear(x[:4], dropout_key=k))(keys)
  plain = linear(x[:4])
  np.testing.assert_allclose(many.mean(0), plain, atol=0.05 * float(jnp.abs(plain).max()))


def test_batch_norm_trains_on_batch_statistics_and_infers_on_running_averages():
  config = ModelConfig(conv_features=(8,), dense_features=(16,), norm="batch")
  model = build_model(config, seed=0)
  # The conv loses its bias to batch norm's shift; scale and shift are parameters.
  assert count_params(model) == 9 * 8 + 2 * 8 + (14 * 14 * 8 * 16 + 16) + (16 * 10 + 10)
  x = jax.random.uniform(jax.random.key(0), (32, 28, 28, 1))
  before = model(x)
  np.testing.assert_array_equal(model(x), before)  # inference leaves the statistics alone
  np.testing.assert_array_equal(model.norms[0].mean[...], np.zeros(8))
  training = model(x, train=True)
  conv_out = model.convs[0](x)
  # One update with momentum 0.9 from mean 0 / var 1.
  np.testing.assert_allclose(model.norms[0].mean[...], 0.1 * conv_out.mean((0, 1, 2)),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(model.norms[0].var[...], 0.9 + 0.1 * conv_out.var((0, 1, 2)),
                             rtol=1e-4)
  assert not np.allclose(training, before) and not np.allclose(model(x), before)
  # In training each channel is normalised by the batch's own statistics.
  normalised = model.norms[0](conv_out, use_running_average=False)
  np.testing.assert_allclose(normalised.mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(normalised.var((0, 1, 2)), 1, rtol=1e-3)


def test_dropout_adds_no_state():
  plain = nnx.state(build_model(ModelConfig(), seed=0))
  dropped = nnx.state(build_model(ModelConfig(dropout=0.3), seed=0))
  assert jax.tree.structure(plain) == jax.tree.structure(dropped)


def test_build_model_inside_a_trace_gives_the_same_parameters():
  config = ModelConfig(conv_features=(8,), dense_features=(16,))
  top = nnx.state(build_model(config, seed=2), nnx.Param)
  inside = nnx.state(nnx.jit(lambda: build_model(config, seed=2))(), nnx.Param)
  shapes = nnx.state(nnx.eval_shape(lambda: build_model(config, seed=2)), nnx.Param)
  for want, got, shape in zip(*(jax.tree.leaves(t) for t in (top, inside, shapes))):
    np.testing.assert_array_equal(got, want)
    assert (shape.shape, shape.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("kwargs, message", [
    (dict(conv_features=()), "conv_features"),
    (dict(conv_features=(8, 8, 8, 8)), "conv_features"),
    (dict(dense_features=(0,)), "positive"),
    (dict(kernel_size=4), "kernel_size must be 3, 5 or 7, got 4"),
    (dict(pool="median"), "pool"),
    (dict(dropout=1.0), "dropout must be a rate in \\[0, 1\\), got 1.0"),
    (dict(norm="layer"), "norm must be 'none' or 'batch', got 'layer'"),
    (dict(num_classes=12), "num_classes must be 10 \\(MNIST's digits\\), got 12"),
])
def test_bad_model_config_names_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=0), "epochs must be in \\[1, 10000\\], got 0"),
    (dict(epochs=99999999999), "epochs must be in \\[1, 10000\\], got 99999999999"),
    (dict(seed=2**64), "seed must be in \\[0, 2\\*\\*32 - 1\\], got 18446744073709551616"),
    (dict(seed=-1), "seed must be in"),
    (dict(cycle_start=3, epochs=3), "cycle_start must be in \\[0, epochs\\)"),
    (dict(batch_size=-1), "batch_size"),
    (dict(learning_rate=0), "learning_rate"),
    (dict(max_shift=9), "max_shift"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(max_rotation=1.0), "max_rotation .* radians, got 1.0"),
    (dict(max_scale=-0.1), "max_scale"),
])
def test_bad_train_config_names_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(**kwargs)


def test_config_round_trips_through_dict():
  m = ModelConfig(conv_features=(4, 8), dense_features=(16,))
  assert ModelConfig.from_dict(m.to_dict()) == m
  t = TrainConfig(epochs=3, seed=7)
  assert TrainConfig.from_dict(t.to_dict()) == t
  with pytest.raises(ValueError, match="unknown TrainConfig fields"):
    TrainConfig.from_dict({"epochs": 1, "momentum": 0.9})


def test_presets():
  from flaxdigits.config import PRESETS, preset
  assert preset("default") == (ModelConfig(), TrainConfig())
  model, recipe = preset("fast")
  assert recipe.epochs == 2 and model.conv_features == (16, 32)
  model, recipe = preset("best")
  assert recipe.epochs == 15 and model.conv_features == (48, 96, 192) and model.pool == "max"
  assert recipe.outlier_exposure == 0.25  # chosen on held-out images (docs/benchmarks.md)
  model, recipe = preset("speedrun")
  assert recipe.epochs == 1 and model.conv_features == (12, 24) and not recipe.outlier_exposure
  with pytest.raises(ValueError, match="unknown preset 'fastest'; choose one of default, fast, "
                     "best, speedrun"):
    preset("fastest")
  assert set(PRESETS) == {"default", "fast", "best", "speedrun"}


@pytest.mark.parametrize("kind, reference", [("avg", nnx.avg_pool), ("max", nnx.max_pool)])
@pytest.mark.parametrize("side", [28, 7])
def test_pool2x2_is_2x2_stride_2_valid_pooling(kind, reference, side):
  x = jax.random.normal(jax.random.key(3), (2, side, side, 3))
  want = reference(x, window_shape=(2, 2), strides=(2, 2))
  np.testing.assert_allclose(pool2x2(x, kind), want, rtol=1e-6)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(pool2x2(x, kind))))(x)
  g_want = jax.grad(lambda x: jnp.sum(jnp.sin(reference(x, (2, 2), (2, 2)))))(x)
  np.testing.assert_allclose(g, g_want, rtol=1e-5, atol=1e-6)
