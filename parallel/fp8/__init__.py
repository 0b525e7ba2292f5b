"""FP8 projections, swapped into a built model when ``train.precision=fp8``: the public API and the availability
checks (``swap.py``: ``convert_to_fp8``, ``fp8_context``, ``fp8_stats``, ``fp8_unavailable_here``), torchao float8
training for dense projections (``torchao_backend.py``, the default backend), a rowwise-scaled grouped FP8 GEMM for
the experts (``grouped.py``, with a CPU emulation in ``emulation.py`` for tests) behind expert stand-ins shared by
both backends (``experts.py``), and Transformer Engine modules on clusters that have it (``te.py``; untested here:
TE cannot be installed on the project's machines). Only the TP linears' FP8 matmul touches process groups. Details:
docs/fp8.md.
"""
