"""Triton kernels of the attention library: mask_kernels.py (tile pooling and the sort-free CDF
selection behind masks.py on CUDA). Without Triton (the CPU torch wheel) masks.py uses its torch
path; CI runs the kernels under Triton's CPU interpreter."""
