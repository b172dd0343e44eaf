"""Tests of wan_nabla/wan/ (the diffusers coupling: apply_attention, the processor) under diffusers' own usage."""
