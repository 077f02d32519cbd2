"""torch.hub entry points: ``torch.hub.load("<owner>/crfasrnn", "crfasrnn_voc")`` builds CRF-RNN with its weights.

The weights are the published ones by default (``voc-coco``, downloaded once into torch.hub's cache and verified, see
:mod:`crfasrnn.weights.hub`); any name, URL or local file :func:`crfasrnn.load_model` takes may be given instead. The
published model is for non-commercial use only (its model card).
"""

from __future__ import annotations

import sys
from pathlib import Path

dependencies = ["torch", "numpy", "numba", "PIL", "google.protobuf", "safetensors", "tqdm"]

try:  # an installed crfasrnn, else the checkout torch.hub downloaded (its sources are in src/)
    import crfasrnn  # noqa: F401
except ImportError:  # pragma: no cover - exercised by torch.hub, not by the test suite's installed package
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))


def crfasrnn_voc(pretrained: bool = True, weights: str = "voc-coco", num_iterations: int = 10, **crf_kwargs):
    """CRF-RNN (FCN-8s + CRF-RNN) for the 21 PASCAL VOC classes, in eval mode.

    Args:
        pretrained: load ``weights``; False gives the untrained network (FCN initialisation, Potts CRF).
        weights: a published name (``voc-coco``, ``voc-coco-caffe``, ``voc-coco-keras``), an http(s) URL or a file.
        num_iterations: mean-field iterations (10 at test time in the paper).
        **crf_kwargs: options of :class:`crfasrnn.CrfRnn` (bandwidths, back end).
    """
    from crfasrnn import CrfRnnNet, load_model

    if not pretrained:
        return CrfRnnNet(21, num_iterations, **crf_kwargs).eval()
    model, _ = load_model(weights, num_iterations=num_iterations, **crf_kwargs)
    return model
