"""Results into a caller's output buffer (the ``out=`` of the public API)."""


def deliver(result, out):
    """``result`` itself when ``out`` is None (or is the result), else
    ``result`` copied into ``out`` (NumPy, CuPy or torch arrays, or a Numba
    device array), and ``out``. ``out`` was checked by
    ``validation.check_out``: same type, shape and dtype as the input."""
    if out is None or result is out:
        return result
    if hasattr(out, "copy_to_device"):  # a Numba device array
        out.copy_to_device(result)
    else:
        out[...] = result
    return out
