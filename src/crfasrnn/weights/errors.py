"""The error every weights reader raises: :class:`WeightsError`.

It lives in a module of its own because every other module of :mod:`crfasrnn.weights` raises it (the Caffe reader,
the key conversions, the writer and the loader), and :mod:`~crfasrnn.weights.load` imports all of them.
"""

from __future__ import annotations

__all__ = ["WeightsError"]


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message names the file and the tensor."""
