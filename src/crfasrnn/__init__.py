"""CRF-RNN semantic segmentation for modern PyTorch."""

from .crf import CrfRnn, crf_rnn, set_finite_check
from .engine import DenseCRF, GaussianKernel, dense_crf
from .lattice import PermutohedralLattice, permutohedral_filter
from .models import CrfRnnNet, FCN8s
from .refine import refine
from .transforms import VOC_CLASSES, VOC_MEAN_RGB, postprocess, prepare, preprocess
from .weights import WeightsError, WeightsInfo, convert_weights, load_model, load_weights, read_weights, save_weights

__all__ = [
    "CrfRnn",
    "crf_rnn",
    "set_finite_check",
    "DenseCRF",
    "GaussianKernel",
    "dense_crf",
    "PermutohedralLattice",
    "permutohedral_filter",
    "FCN8s",
    "CrfRnnNet",
    "refine",
    "VOC_CLASSES",
    "VOC_MEAN_RGB",
    "preprocess",
    "prepare",
    "postprocess",
    "load_model",
    "load_weights",
    "read_weights",
    "save_weights",
    "convert_weights",
    "WeightsInfo",
    "WeightsError",
]
__version__ = "0.1.0"
