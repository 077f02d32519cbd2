"""Higher-order potentials of the CRF-RNN layer: object detections and superpixels.

Arnab, Jayasumana, Zheng and Torr, *Higher Order Conditional Random Fields in Deep Neural Networks*, ECCV 2016 (code:
torrvision/caffe-tvg). The potentials join the mean field of :class:`crfasrnn.crf.CrfRnn` (``CrfRnn(...,
detections=True, superpixel_scales=S)``, then ``crf(unary, image, detections=..., superpixels=...)``); this package
holds their inputs (``_inputs``: :class:`Detections`, :class:`Superpixels`, reading and making them) and their
terms and the mean field that runs with them (``_potentials``, whose docstring states the equations).
"""

from ._inputs import Detections, Superpixels, read_detections, read_image_detections, slic_superpixels
from ._potentials import (
    HigherOrderPotentials,
    SuperpixelPotential,
    detection_update,
    detection_y_init,
    mean_field_higher_order,
    superpixel_mean_term,
    superpixel_potts_term,
)

__all__ = [
    "Detections",
    "HigherOrderPotentials",
    "SuperpixelPotential",
    "Superpixels",
    "detection_update",
    "detection_y_init",
    "mean_field_higher_order",
    "read_detections",
    "read_image_detections",
    "slic_superpixels",
    "superpixel_mean_term",
    "superpixel_potts_term",
]
