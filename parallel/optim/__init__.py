"""The optimizer side of a training step, collective over the data-parallel groups: gradient reduction over the
(expert-)data-parallel groups, the de-duplicated global gradient norm and clipping (``grads.py``), and the
optimizer (``optimizer.py``: megatron-core's distributed optimizer with fp32 main weights sharded over DP, or torch
AdamW replicated on every DP rank, and the checkpoint form of their state).
"""
