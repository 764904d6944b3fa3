"""Segmented operations of the batched multi-task forward (torch on CPU; CUDA variants later).

Each wrapper's docstring states its math, shapes and invariants. "Segment" = a contiguous range of
rows [start, end) of a packed batch that share one task's extension.
"""
