"""All coupling to diffusers' Wan2.1 transformer: the attention processor and the model hooks.

from wan_nabla.wan.hooks import apply_attention     # processor.py holds WanSparseAttnProcessor
"""
