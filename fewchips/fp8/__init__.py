"""FP8 fine-grained mixed precision (arXiv 2412.19437 §3.3): quantisation primitives, FP8 GEMMs with a
Hopper fast path and a plain-PyTorch twin, FP8 training layers, FP8 checkpoints.

    from fewchips.fp8 import apply_fp8
    apply_fp8(model)              # attention projections, dense MLPs and experts now train in FP8
    save_fp8(model, "ckpt-fp8")   # the released checkpoint layout; load_fp8 keeps weights in FP8
"""

from ..lazy import lazy_attributes

# name -> submodule (FP8 checkpoints live in fewchips.checkpoint.fp8); loaded on first use, so that
# `fewchips.fp8.quant` (a leaf: torch only) can be imported by checkpoint I/O without the FP8 layers.
_LAZY = {"convert": ".checkpoint.fp8", "load_fp8": ".checkpoint.fp8", "save_fp8": ".checkpoint.fp8", "fp8_mm": "gemm",
         "resolve_backend": "gemm", "FP8Linear": "linear", "FP8RoutedExperts": "linear", "apply_fp8": "recipe",
         "fp8_linear": "linear", "BLOCK": "quant", "E4M3": "quant", "TILE": "quant", "dequantize": "quant",
         "quantize": "quant", "retile": "quant", "is_fp8_linear": "recipe", "is_fp8_weight": "recipe"}

__all__ = sorted(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
