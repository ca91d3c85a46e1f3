"""bnkernels inside Keras 3: :class:`BatchNormalization`, a drop-in
``keras.layers.BatchNormalization`` whose training and inference passes run
bnkernels' kernels (through the torch custom operator
``torch.ops.bnkernels.batch_norm``, so ``model.fit`` differentiates with its
autograd formula).

It needs Keras 3 on the torch backend (``KERAS_BACKEND=torch``, set before
keras is first imported). Importing this module imports keras (``import
bnkernels`` never does); bnkernels' torch operators are imported at the
first call (Keras' torch backend has imported torch by then)::

    import os; os.environ["KERAS_BACKEND"] = "torch"
    import keras
    from bnkernels.keras import BatchNormalization

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32),
                              BatchNormalization(), keras.layers.Dense(10, activation="softmax")])

Under another Keras backend (jax, tensorflow, numpy) constructing the layer
raises ``NotImplementedError`` (a ``RuntimeError``) naming that backend:
bnkernels reaches those frameworks' autodiff through torch only.
"""
from __future__ import annotations

import keras
from keras import ops

__all__ = ["BatchNormalization"]


def _require_torch_backend() -> None:
    active = keras.backend.backend()
    if active != "torch":
        raise NotImplementedError(
            f"bnkernels.keras.BatchNormalization runs on Keras' torch backend only; the active Keras backend is "
            f"{active!r}. Set KERAS_BACKEND=torch before keras is first imported, or use "
            "keras.layers.BatchNormalization on this backend.")


@keras.saving.register_keras_serializable(package="bnkernels")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` on bnkernels' kernels.

    The constructor, weights (``gamma``, ``beta``, ``moving_mean``,
    ``moving_variance``, each of shape (C,) in the variable dtype: float32
    under ``"mixed_float16"``) and config are Keras' own, so
    ``get_weights``/``set_weights`` and saved models interchange with
    ``keras.layers.BatchNormalization``; one keyword is added:

    Args:
        kernel_backend: the bnkernels backend (``"auto"``: by the tensors'
            device: numba, else numpy on the CPU; a GPU backend for CUDA
            tensors; see ``bnkernels.available_backends()``). Kept in
            ``get_config``.
        (all others): as ``keras.layers.BatchNormalization``.

    Call:
        inputs: tensor of any rank >= 1, channels along ``axis``; float16,
            bfloat16, float32 or float64. Normalized in float32 (half
            inputs: by the kernels, in float32), float64 ones too: Keras'
            layer computes in ``result_type(x.dtype, "float32")``, which
            Keras 3 maps to float32 for float64 (64-bit types become 32-bit
            in its promotion). Returns a tensor of the layer's compute dtype.
        training: batch statistics (True) or the moving ones (False or
            None, Keras' default outside ``fit``). A frozen layer
            (``trainable=False``) always runs in inference mode, as Keras'.
        mask: see below.

    Semantics, Keras' exactly (not torch's): in training ``y = (x - mean) /
    sqrt(var + epsilon) * gamma + beta`` with the batch mean and *biased*
    variance, and ``moving = moving * momentum + batch * (1 - momentum)``
    (momentum weighs the old value), the moving variance taking the biased
    batch variance too. The statistics are bnkernels' exact (shifted)
    ones, never Keras-on-torch's ``E[x^2] - E[x]^2``: on data far from zero
    the results are closer to the float64 truth than Keras' own layer's.
    Half inputs go to the kernels as they are (the kernels compute in
    float32, where Keras upcasts the input first): the same up to rounding.

    Keras' own computation (``super().call``) runs instead for what the
    kernels do not do as Keras does: a ``mask`` in training (Keras' masked
    moments divide by ``count + 1e-7``; in inference a mask plays no part
    and the kernels run), ``renorm=True``, and a training batch with fewer
    than 2 values per channel (Keras: variance 0 or NaN; bnkernels refuses
    one value as torch does). ``synchronized=True`` raises Keras' own
    ``ValueError`` (Keras supports it on TensorFlow only).
    """

    def __init__(self, *args, kernel_backend: str = "auto", **kwargs):
        _require_torch_backend()  # first: nothing is built for a layer that could never run
        super().__init__(*args, **kwargs)
        if not isinstance(kernel_backend, str):
            raise TypeError(f"kernel_backend must be a bnkernels backend name (str), got {kernel_backend!r}")
        self.kernel_backend = kernel_backend

    def get_config(self):
        return {**super().get_config(), "kernel_backend": self.kernel_backend}

    def call(self, inputs, training=None, mask=None):
        import torch

        from .torch.ops import batch_norm_on_axis

        inputs = ops.convert_to_tensor(inputs)
        train = bool(training) and self.trainable  # Keras: `training and self.trainable`
        if self.renorm or (train and mask is not None):
            return super().call(inputs, training=training, mask=mask)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError("The mask provided should be one dimension less than the inputs. Received: "
                             f"mask.shape={mask.shape}, inputs.shape={inputs.shape}")
        channels = inputs.shape[self.axis]
        count = inputs.numel() // channels if channels else 0  # values per channel
        if train and count < 2:
            return super().call(inputs, training=training, mask=mask)

        # Keras normalizes in result_type(x, float32) (float32 even for float64 x: Keras' promotion makes 64-bit
        # types 32-bit) and casts gamma, beta and the moving statistics to it; half x stays half for the kernels,
        # which compute in float32.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = inputs if inputs.dtype in (torch.float16, torch.bfloat16) else ops.cast(inputs, dtype)
        gamma = ops.cast(self.gamma.value, dtype) if self.scale else None
        beta = ops.cast(self.beta.value, dtype) if self.center else None
        if not train:
            y = batch_norm_on_axis(x, ops.cast(self.moving_mean.value, dtype),
                                   ops.cast(self.moving_variance.value, dtype), gamma, beta, False, 0.0,
                                   self.epsilon, self.axis, self.kernel_backend)
            return ops.cast(y, self.compute_dtype)

        # Training. The kernels' running update is torch's (weight f on the batch, unbiased variance): with
        # f = 1 on float64 zeros it stores the batch mean and unbiased variance themselves, in float64, from
        # the exact moments (never derived from invstd, which cancels when var << epsilon). Keras' update
        # follows, in float64, with the biased variance.
        batch_mean = torch.zeros(channels, dtype=torch.float64, device=x.device)
        batch_var = torch.zeros(channels, dtype=torch.float64, device=x.device)
        y = batch_norm_on_axis(x, batch_mean, batch_var, gamma, beta, True, 1.0, self.epsilon, self.axis,
                               self.kernel_backend)
        with torch.no_grad():
            batch_var *= (count - 1) / count  # unbiased -> biased: m2 / count
            m = self.momentum
            # assign casts to the variable's dtype (and, in a StatelessScope, records the update instead)
            self.moving_mean.assign(ops.cast(self.moving_mean.value, "float64") * m + batch_mean * (1.0 - m))
            self.moving_variance.assign(
                ops.cast(self.moving_variance.value, "float64") * m + batch_var * (1.0 - m))
        return ops.cast(y, self.compute_dtype)
