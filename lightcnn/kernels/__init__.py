"""Kernels: pure functions on NHWC float32 arrays, forward and backward side by side.

Nothing here holds state or imports from layers/models. See lightcnn/__init__.py
for the shape legend. Each module opens with the formula it computes, its
output-size rule and its cost.
"""
