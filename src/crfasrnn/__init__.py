"""CRF-RNN semantic segmentation for modern PyTorch."""

from .crf import CrfRnn, crf_rnn
from .lattice import PermutohedralLattice, permutohedral_filter
from .refine import refine

__all__ = ["CrfRnn", "crf_rnn", "PermutohedralLattice", "permutohedral_filter", "refine"]
__version__ = "0.1.0"
