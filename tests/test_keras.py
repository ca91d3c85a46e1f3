"""``bnkernels.keras.BatchNormalization`` against Keras 3's own
``keras.layers.BatchNormalization`` (torch backend), with identical weights:
forward in training and inference, moving statistics, gradients,
``model.fit`` histories and weights, the documents' snippets, mixed
precision, ``trainable=False``, serialization, and the error under another
Keras backend (a subprocess on Keras' numpy backend).

"Float32 noise": Keras-on-torch computes the variance as ``E[x^2] - E[x]^2``
(cancellation on data far from zero) where bnkernels' statistics are exact,
so the two agree to a few float32 ulps on data of mean 3 and deviation 2;
on data where Keras' formula cancels, bnkernels is checked against float64.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras' first import: it reads the backend once
keras = pytest.importorskip("keras", minversion="3")
torch = pytest.importorskip("torch")
if keras.backend.backend() != "torch":
    pytest.skip(f"keras was imported with the {keras.backend.backend()!r} backend; these tests need "
                "KERAS_BACKEND=torch", allow_module_level=True)

import bnkernels  # noqa: E402
from bnkernels.keras import BatchNormalization  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    # Keras 3.15's Variable.numpy() (get_weights) calls np.array(variable), whose __array__ takes no `copy`:
    # NumPy 2 warns about Keras' code, not ours
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]
ROOT = Path(__file__).resolve().parents[1]
# Keras 3 warns about `input_shape=` on a layer (prefer keras.Input); the documents' snippets use it
INPUT_SHAPE_WARNING = "ignore:Do not pass an `input_shape`.*:UserWarning"


def _np(t):
    return keras.ops.convert_to_numpy(t)


def _close(actual, expected, what, rtol=1e-5, atol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.abs(expected).max(initial=0.0)) + 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale, err_msg=what)


def _pair(shape, rng, **kwargs):
    """Ours and Keras' layer, built for ``shape`` with the same random weights."""
    ours, theirs = BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    ours.build(shape)
    theirs.build(shape)
    weights = [rng.uniform(0.5, 1.5, w.shape).astype(w.dtype) for w in theirs.get_weights()]
    theirs.set_weights(weights)
    ours.set_weights(theirs.get_weights())
    return ours, theirs


def _assert_same_weights(ours, theirs, rtol=1e-5, atol=1e-6):
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    for a, b, w in zip(ours.get_weights(), theirs.get_weights(), theirs.weights):
        assert a.dtype == b.dtype, w.name
        _close(a, b, w.name, rtol, atol)


CASES = [((32, 7), -1), ((32, 7), 1), ((6, 5, 3), -1), ((8, 5, 6, 4), -1), ((8, 4, 5, 6), 1)]


@pytest.mark.parametrize("shape,axis", CASES)
def test_training_and_inference_match_keras(shape, axis):
    rng = np.random.default_rng(1)
    ours, theirs = _pair(shape, rng, axis=axis, momentum=0.9)
    channels = shape[axis]
    moving = [w.astype(np.float64) for w in theirs.get_weights()[2:]]
    for step in range(4):
        x = rng.normal(3, 2, shape).astype(np.float32)
        _close(_np(ours(x, training=True)), _np(theirs(x, training=True)), f"training y, step {step}")
        # Keras' update in float64: momentum weighs the old value, the batch variance is the biased one
        flat = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, channels)
        moving = [moving[0] * 0.9 + flat.mean(0) * 0.1, moving[1] * 0.9 + flat.var(0) * 0.1]
        _close(ours.moving_mean.numpy(), moving[0], "moving_mean vs float64", 1e-6, 1e-7)
        _close(ours.moving_variance.numpy(), moving[1], "moving_variance vs float64", 1e-6, 1e-7)
    _assert_same_weights(ours, theirs)
    x = rng.normal(3, 2, shape).astype(np.float32)
    for training in (False, None):  # None outside fit: inference, as Keras
        _close(_np(ours(x, training=training)), _np(theirs(x, training=training)), f"training={training}")
    _close(_np(ours(x)), _np(theirs(x)), "default call")


def test_calls_run_bnkernels():
    """Both modes reach bnkernels' dispatch (its error for a bad backend
    name), and each CPU backend gives Keras' results."""
    x = np.random.default_rng(15).normal(3, 2, (8, 5, 6, 4)).astype(np.float32)
    layer = BatchNormalization(kernel_backend="no-such-backend")
    for training in (True, False):
        with pytest.raises(ValueError, match="unknown backend 'no-such-backend'"):
            layer(x, training=training)
    available = [name for name, s in bnkernels.available_backends().items() if s.available and s.device == "cpu"]
    for name in available:
        ours, theirs = BatchNormalization(kernel_backend=name), keras.layers.BatchNormalization()
        for step in range(2):
            _close(_np(ours(x + step, training=True)), _np(theirs(x + step, training=True)), f"{name} training")
        _assert_same_weights(ours, theirs)
        _close(_np(ours(x)), _np(theirs(x)), f"{name} inference")


def test_gradients_match_keras():
    rng = np.random.default_rng(2)
    ours, theirs = _pair((16, 3, 4, 5), rng, axis=-1)
    x = rng.normal(3, 2, (16, 3, 4, 5)).astype(np.float32)
    dy = torch.tensor(rng.normal(size=x.shape).astype(np.float32))
    grads = []
    for layer in (ours, theirs):
        xt = torch.tensor(x, requires_grad=True)
        (layer(xt, training=True) * dy).sum().backward()
        grads.append([xt.grad.numpy()] + [w.value.grad.numpy() for w in layer.trainable_weights])
    for a, b, what in zip(*grads, ("dx", "dgamma", "dbeta")):
        _close(a, b, what, 1e-4, 1e-5)


@pytest.mark.parametrize("mean,std", [(1000.0, 0.05), (0.0, 1e-4)])
def test_exact_statistics(mean, std):
    """Far from zero (where Keras' E[x^2] - E[x]^2 cancels in float32) and
    with var << epsilon (where a variance derived from invstd would), the
    moving statistics are those of float64."""
    rng = np.random.default_rng(3)
    layer = BatchNormalization(momentum=0.5)
    x = rng.normal(mean, std, (64, 6)).astype(np.float32)
    y = _np(layer(x, training=True))
    x64 = x.astype(np.float64)
    _close(layer.moving_mean.numpy(), 0.5 * x64.mean(0), "moving_mean", 1e-6, 0)
    _close(layer.moving_variance.numpy(), 0.5 + 0.5 * x64.var(0), "moving_variance", 1e-6, 0)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + layer.epsilon)
    _close(y, expected, "y vs float64", 1e-4, 1e-4)


def test_set_weights_interchange():
    rng = np.random.default_rng(4)
    ours, theirs = _pair((10, 6), rng)
    ours.set_weights([w * 2 for w in theirs.get_weights()])
    theirs.set_weights(ours.get_weights())
    _assert_same_weights(ours, theirs, 0, 0)
    assert [w.name for w in ours.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.name for w in ours.trainable_weights] == ["gamma", "beta"]


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_center_scale(center, scale):
    rng = np.random.default_rng(5)
    ours, theirs = _pair((12, 5), rng, center=center, scale=scale)
    assert len(ours.weights) == len(theirs.weights) == 2 + center + scale
    x = rng.normal(3, 2, (12, 5)).astype(np.float32)
    _close(_np(ours(x, training=True)), _np(theirs(x, training=True)), "training")
    _close(_np(ours(x)), _np(theirs(x)), "inference")
    _assert_same_weights(ours, theirs)


def test_custom_initializers():
    def kwargs():
        init = keras.initializers
        return dict(gamma_initializer=init.RandomUniform(0.5, 2.0, seed=7), beta_initializer=init.Constant(0.25),
                    moving_mean_initializer=init.Constant(3.0), moving_variance_initializer=init.Constant(4.0))

    ours, theirs = BatchNormalization(**kwargs()), keras.layers.BatchNormalization(**kwargs())
    ours.build((8, 4))
    theirs.build((8, 4))
    _assert_same_weights(ours, theirs, 0, 0)
    x = np.random.default_rng(6).normal(3, 2, (8, 4)).astype(np.float32)
    _close(_np(ours(x)), _np(theirs(x)), "inference with the initial moving statistics")


def _sequential(bn, *extra):
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"), bn(momentum=0.8),
                             *extra, keras.layers.Dense(3, activation="softmax")])


def _fit_both(make, x, y, epochs, **compile_kwargs):
    """The model with ours and with Keras' layer from the same initial
    weights, each fitted: (histories, models). A callable ``optimizer``
    makes one per model (an optimizer serves one model's variables)."""
    keras.utils.set_random_seed(0)
    ours, theirs = make(BatchNormalization), make(keras.layers.BatchNormalization)
    theirs.set_weights(ours.get_weights())
    histories = []
    for model in (ours, theirs):
        optimizer = compile_kwargs["optimizer"]
        model.compile(**{**compile_kwargs, "optimizer": optimizer() if callable(optimizer) else optimizer})
        histories.append(model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0).history)
    return histories, (ours, theirs)


def _data(rng, n, d, classes=10):
    x = rng.normal(3, 2, (n, d)).astype(np.float32)
    return x, keras.utils.to_categorical(rng.integers(0, classes, n), classes).astype(np.float32)


def test_fit_matches_keras():
    x, y = _data(np.random.default_rng(7), 64, 12, 3)
    (h_ours, h_theirs), (ours, theirs) = _fit_both(
        lambda bn: _sequential(bn, bn()), x, y, 4, optimizer=lambda: keras.optimizers.SGD(0.1),
        loss="categorical_crossentropy")
    _close(h_ours["loss"], h_theirs["loss"], "losses", 1e-5, 1e-6)
    bn = [layer for layer in ours.layers if isinstance(layer, BatchNormalization)]
    assert len(bn) == 2 and not np.allclose(bn[0].moving_mean.numpy(), 0)  # trained: its statistics moved
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        _close(a, b, "weights after fit", 1e-4, 1e-5)
    _close(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), "predictions", 1e-4, 1e-5)


def _snippet_001(bn, input_dim=20):
    # /work/shared/seeds/001: from tensorflow.keras.layers import BatchNormalization, Dense
    from keras.layers import Dense
    from keras.models import Sequential
    model = Sequential()
    model.add(Dense(64, activation='relu', input_shape=(input_dim,)))
    model.add(bn())
    model.add(Dense(10, activation='softmax'))
    return model


def _snippet_002(bn):
    # /work/shared/seeds/002
    from keras.layers import Dense
    from keras.models import Sequential
    model = Sequential()
    model.add(Dense(32, input_shape=(64,)))
    model.add(bn())
    model.add(Dense(32))
    model.add(bn())
    model.add(Dense(10, activation='softmax'))
    return model


@pytest.mark.filterwarnings(INPUT_SHAPE_WARNING)
@pytest.mark.parametrize("snippet,input_dim", [(_snippet_001, 20), (_snippet_002, 64)])
def test_document_snippets(snippet, input_dim):
    x, y = _data(np.random.default_rng(8), 48, input_dim)
    (h_ours, h_theirs), (ours, theirs) = _fit_both(
        snippet, x, y, 2, optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
    assert any(isinstance(layer, BatchNormalization) for layer in ours.layers)
    assert np.isfinite(h_ours["loss"]).all() and len(h_ours["loss"]) == 2
    _close(h_ours["loss"], h_theirs["loss"], "losses", 1e-5, 1e-6)
    _close(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), "predictions", 1e-4, 1e-5)


def test_mixed_float16():
    rng = np.random.default_rng(9)
    ours, theirs = _pair((32, 8), rng, dtype="mixed_float16")
    assert ours.compute_dtype == "float16" and all(w.dtype == "float32" for w in ours.weights)
    for step in range(3):
        x = rng.normal(3, 2, (32, 8)).astype(np.float32)  # autocast to float16 by the layers
        a, b = ours(x, training=True), theirs(x, training=True)
        assert a.dtype == b.dtype == torch.float16
        _close(_np(a), _np(b), f"float16 training y, step {step}", 2e-3, 1e-3)
    _assert_same_weights(ours, theirs, 1e-5, 1e-6)
    _close(_np(ours(x)), _np(theirs(x)), "float16 inference y", 2e-3, 1e-3)
    dy = torch.tensor(rng.normal(size=x.shape).astype(np.float32))
    grads = []
    for layer in (ours, theirs):
        (layer(x, training=True).float() * dy).sum().backward()
        grads.append([w.value.grad for w in layer.trainable_weights])
    for a, b, what in zip(*grads, ("dgamma", "dbeta")):
        assert a.dtype == b.dtype == torch.float32, what
        _close(a.numpy(), b.numpy(), f"float16 {what}", 2e-3, 2e-3)


def test_float64_policy_computes_as_keras():
    """Keras normalizes a float64 layer's data in float32 (its promotion of
    float64 with "float32" is float32); so does this layer, and both
    return float64."""
    rng = np.random.default_rng(17)
    ours, theirs = _pair((16, 6), rng, dtype="float64")
    x = torch.tensor(rng.normal(3, 2, (16, 6)))
    a, b = ours(x, training=True), theirs(x, training=True)
    assert a.dtype == b.dtype == torch.float64 and all(w.dtype == "float64" for w in ours.weights)
    _close(_np(a), _np(b), "float64 training y")
    _assert_same_weights(ours, theirs)
    _close(_np(ours(x)), _np(theirs(x)), "float64 inference y")


def test_trainable_false_is_inference():
    rng = np.random.default_rng(10)
    ours, theirs = _pair((16, 4), rng)
    ours.trainable = theirs.trainable = False
    before = ours.get_weights()
    x = rng.normal(3, 2, (16, 4)).astype(np.float32)
    _close(_np(ours(x, training=True)), _np(theirs(x, training=False)), "frozen layer in training")
    for a, b in zip(ours.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_fit_with_frozen_layer_keeps_its_statistics():
    x, y = _data(np.random.default_rng(11), 32, 12, 3)

    def make(bn):
        model = _sequential(bn)
        model.layers[1].trainable = False
        return model

    (h_ours, h_theirs), (ours, theirs) = _fit_both(make, x, y, 2, optimizer="sgd", loss="categorical_crossentropy")
    _close(h_ours["loss"], h_theirs["loss"], "losses", 1e-5, 1e-6)
    np.testing.assert_array_equal(ours.layers[1].moving_mean.numpy(), 0)


def test_masked_calls_match_keras():
    """Masks (as an Embedding(mask_zero=True) gives): Keras' masked moments
    in training, the kernels in inference (where a mask plays no part)."""
    rng = np.random.default_rng(12)
    ours, theirs = _pair((4, 6, 3), rng)
    x = rng.normal(3, 2, (4, 6, 3)).astype(np.float32)
    mask = torch.tensor(rng.random((4, 6)) < 0.7)
    for training in (True, False):
        _close(_np(ours(x, training=training, mask=mask)), _np(theirs(x, training=training, mask=mask)),
               f"masked, training={training}")
    _assert_same_weights(ours, theirs)
    with pytest.raises(ValueError, match="one dimension less"):
        ours(x, mask=torch.ones(4, 6, 3, dtype=torch.bool))


def test_keras_fallbacks():
    rng = np.random.default_rng(13)
    one = rng.normal(3, 2, (1, 5)).astype(np.float32)  # one value per channel: Keras' variance 0
    ours, theirs = _pair((1, 5), rng)
    _close(_np(ours(one, training=True)), _np(theirs(one, training=True)), "one value per channel")
    _assert_same_weights(ours, theirs)
    ours, theirs = _pair((8, 5), rng, renorm=True)
    x = rng.normal(3, 2, (8, 5)).astype(np.float32)
    _close(_np(ours(x, training=True)), _np(theirs(x, training=True)), "renorm")
    with pytest.raises(ValueError, match="synchronized"):
        BatchNormalization(synchronized=True)


def test_serialization_round_trip(tmp_path):
    assert keras.saving.get_registered_name(BatchNormalization) == "bnkernels>BatchNormalization"
    layer = BatchNormalization(axis=1, momentum=0.7, epsilon=1e-4, kernel_backend="numpy",
                               gamma_regularizer=keras.regularizers.L2(0.01))
    config = layer.get_config()
    clone = BatchNormalization.from_config(config)
    assert clone.get_config() == config and clone.kernel_backend == "numpy"
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is BatchNormalization and again.get_config() == config

    x, y = _data(np.random.default_rng(14), 32, 12, 3)
    model = _sequential(BatchNormalization)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.layers[1]) is BatchNormalization
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_other_keras_backend_raises():
    """Keras' numpy backend: importing works (and imports neither torch's
    half of bnkernels nor, for plain ``import bnkernels``, keras or torch);
    constructing the layer raises, naming the backend and the way out."""
    script = textwrap.dedent("""
        import sys
        import bnkernels
        assert "keras" not in sys.modules and "torch" not in sys.modules, "import bnkernels imported them"
        import bnkernels.keras
        assert "bnkernels.torch" not in sys.modules
        try:
            bnkernels.keras.BatchNormalization()
        except NotImplementedError as e:
            print("raised:", e)
        else:
            raise SystemExit("no error")
    """)
    env = {**os.environ, "KERAS_BACKEND": "numpy", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'numpy'" in proc.stdout and "KERAS_BACKEND=torch" in proc.stdout
    assert "keras.layers.BatchNormalization" in proc.stdout
    assert issubclass(NotImplementedError, RuntimeError)
