"""LLVM IR types shared by the vector kernels (``gemv``, ``gemm``, ``dequant``). A leaf: imports llvmlite only.

>>> str(V8F)
'<8 x float>'
"""

from llvmlite import ir

I32 = ir.IntType(32)
I64 = ir.IntType(64)
V8F = ir.VectorType(ir.FloatType(), 8)  # 8 float32 lanes: one AVX2 register
V8I = ir.VectorType(I32, 8)
V8B = ir.VectorType(ir.IntType(8), 8)  # 8 codes, widened to V8I before conversion
