"""LLVM IR types shared by the vector kernels (``gemv``, ``gemm``, ``dequant``). A leaf: imports llvmlite only.

>>> str(V8F), str(vec(ir.HalfType(), 16))
('<8 x float>', '<16 x half>')
"""

from llvmlite import ir

I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()
F16 = ir.HalfType()
V8F = ir.VectorType(F32, 8)  # 8 float32 lanes: one AVX2 register
V8I = ir.VectorType(I32, 8)
V8B = ir.VectorType(I8, 8)  # 8 codes, widened to V8I before conversion


def vec(elem: ir.Type, lanes: int) -> ir.VectorType:
    """``<lanes x elem>``: the kernels pick 16 lanes (one AVX-512 register of float32) where a row allows."""
    return ir.VectorType(elem, lanes)
