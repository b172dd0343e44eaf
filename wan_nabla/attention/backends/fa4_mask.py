"""The pad-key mask_mod of the flash-attn-4 path: a CuTe DSL function (imported only by fa4.py).

Limits: needs the CUTLASS DSL (nvidia-cutlass-dsl) to import; SM90 calls a mask_mod per element
(`__vec_size__` 1): a scalar read and a compare.

    from wan_nabla.attention.backends.fa4_mask import key_valid_mask      # needs nvidia-cutlass-dsl
    flash_attn_func(q, k, v, mask_mod=key_valid_mask, aux_tensors=[valid_i32], block_sparse_tensors=...)

FA4 evaluates a mask_mod element by element on the *partial* blocks of its block lists only (full
blocks run unmasked), which is where wan-nabla puts every key block holding a pad token. This one
reads an int32 validity vector over the padded tile-order sequence (1 = real token, 0 = pad;
`fa4.validity`) and keeps a key iff it is real, so pad keys score -inf and get exactly zero weight.

Why a module of its own, defined once at module level: FA4 keys its compile cache on a hash of
the mask_mod's source (plus closure values), and the CuTe DSL parses the function's source, so
the function must live in a real file, take every datum through `aux_tensors`, and capture
nothing; importing this module needs the CUTLASS DSL, which fa4.py loads lazily and guardedly.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from flash_attn.cute import utils as fa_utils


@cute.jit
def key_valid_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    valid = aux_tensors[0]  # int32 [S_pad rounded up to 128]: 1 real token, 0 pad
    is_real = fa_utils.scalar_to_ssa(valid[kv_idx[0]], cutlass.Int32)
    one = fa_utils.scalar_to_ssa(1, cutlass.Int32)
    return is_real == one
