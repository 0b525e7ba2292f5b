"""Triton kernels, each with a torch reference and (where differentiable) an autograd.Function.

- kernels/grouped_gemm.py: grouped expert GEMMs (``torch._grouped_mm``) on device-resident group sizes (no Triton).
- kernels/permute.py: fused permute/unpermute row movement (gathers both ways, fp32 combine) + torch reference.
- kernels/topk_select.py: exact per-row top-k by |score| without a sort (mask or indices).
- kernels/mone.py: MoNE SwiGLU experts, ``mone_swiglu_grouped`` (the contract in moe_core/mone.py) and
  ``mone_swiglu``; training path (grouped GEMMs + fused select/SwiGLU kernels, differentiable).
- kernels/mone_decode.py: the decode path (reads only kept neurons' weights).
Kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 (tests); kernels/runtime.py says which.
"""
