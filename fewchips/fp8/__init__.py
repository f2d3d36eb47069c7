"""FP8 fine-grained mixed precision (reference section 5): quantisation primitives, FP8 GEMMs with a
Hopper fast path and a plain-PyTorch twin, FP8 training layers, FP8 checkpoints.

    from fewchips.fp8 import apply_fp8
    apply_fp8(model)              # attention projections, dense MLPs and experts now train in FP8
    save_fp8(model, "ckpt-fp8")   # the released checkpoint layout; load_fp8 keeps weights in FP8
"""

from .checkpoint import convert, load_fp8, save_fp8
from .gemm import fp8_mm, resolve_backend
from .linear import FP8Linear, FP8RoutedExperts, apply_fp8, fp8_linear
from .quant import BLOCK, E4M3, TILE, dequantize, quantize, retile
from .recipe import is_fp8_linear, is_fp8_weight

__all__ = ["BLOCK", "E4M3", "TILE", "FP8Linear", "FP8RoutedExperts", "apply_fp8", "convert", "dequantize",
           "fp8_linear", "fp8_mm", "is_fp8_linear", "is_fp8_weight", "load_fp8", "quantize", "resolve_backend",
           "retile", "save_fp8"]
