"""Independent references for the sparse-attention tests: brute-force masks and float64 attention.

Nothing here imports wan_nabla's layout or masks: token -> tile mapping, pooling, the CDF rule and
the STA rule are re-derived from their definitions on the raster (unpadded) token order, so a bug
in the fast path cannot hide in a shared helper. Tolerances for comparisons live in TOL.
"""

from __future__ import annotations

import math

import torch

TOL = {
    # fp32 end-to-end transformer outputs (two blocks, tiny dims) vs the same math in float64/fp32.
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    # float64 reference attention vs fp32 flex kernel, per attention call.
    torch.float64: dict(atol=1e-5, rtol=1e-4),
}


def tiny_transformer(seed: int = 0, heads: int = 2, head_dim: int = 24, layers: int = 2):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        rope_max_seq_len=64,
    ).eval()
    # Random (not zero-init) norms/tables so every path carries signal.
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tr


def tile_ids(frames: int, height: int, width: int) -> torch.Tensor:
    """[S] tile index of every raster token (t, h, w): tiles are 8x8 patch squares per frame."""
    nh, nw = math.ceil(height / 8), math.ceil(width / 8)
    ids = []
    for t in range(frames):
        for h in range(height):
            for w in range(width):
                ids.append((t * nh + h // 8) * nw + w // 8)
    return torch.tensor(ids)


def tile_coords(frames: int, height: int, width: int) -> list[tuple[int, int, int]]:
    nh, nw = math.ceil(height / 8), math.ceil(width / 8)
    return [(t, i, j) for t in range(frames) for i in range(nh) for j in range(nw)]


def tile_order(frames: int, height: int, width: int, time_pairs: bool = False) -> list[tuple[int, int, int]]:
    """(t, i, j) of each tile in kernel order: frame-major, or with time pairs (t, i, j), (t+1, i, j)
    adjacent for even t below 2*(F//2), then an odd last frame row-major."""
    nh, nw = math.ceil(height / 8), math.ceil(width / 8)
    if not time_pairs or frames < 2:
        return tile_coords(frames, height, width)
    out = []
    for t0 in range(0, frames // 2 * 2, 2):
        for i in range(nh):
            for j in range(nw):
                out += [(t0, i, j), (t0 + 1, i, j)]
    if frames % 2:
        out += [(frames - 1, i, j) for i in range(nh) for j in range(nw)]
    return out


def valid_tile_order(layout) -> torch.Tensor:
    """[S_pad] bool: which positions of the padded tile-order sequence hold real tokens (from the
    layout's grid and tile order only; tokens inside a tile are row-major 8x8)."""
    out = []
    for _t, i, j in tile_order(layout.frames, layout.height, layout.width, layout.time_pairs):
        for r in range(8):
            for c in range(8):
                out.append(i * 8 + r < layout.height and j * 8 + c < layout.width)
    return torch.tensor(out)


def time_pair_groups(frames: int, height: int, width: int) -> torch.Tensor:
    """[n] query-block id of each tile (standard tile index) for 128-token query blocks in the
    time-paired order: tiles (t, i, j) and (t+1, i, j) share a block for even t < 2*(F//2); in an
    odd last frame, row-major neighbours (2s, 2s+1) share one."""
    nh, nw = math.ceil(height / 8), math.ceil(width / 8)
    hw, e = nh * nw, frames // 2 * 2
    groups = []
    for t, i, j in tile_coords(frames, height, width):
        s = i * nw + j
        groups.append((t // 2) * hw + s if t < e else (e // 2) * hw + s // 2)
    return torch.tensor(groups)


def sta_keep(frames: int, height: int, width: int, window) -> torch.Tensor:
    """[n, n] bool by the distance rule, looping over tile pairs."""
    coords = tile_coords(frames, height, width)
    n = len(coords)
    keep = torch.zeros(n, n, dtype=torch.bool)
    for a, (t, i, j) in enumerate(coords):
        for b, (t2, i2, j2) in enumerate(coords):
            keep[a, b] = (
                abs(t - t2) <= window[0] // 2 and abs(i - i2) <= window[1] // 2 and abs(j - j2) <= window[2] // 2
            )
    return keep


def cdf_keep_rows(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row: visit entries by descending probability, keep while the mass before is < threshold."""
    keep = torch.zeros_like(p, dtype=torch.bool)
    flat_p, flat_k = p.reshape(-1, p.shape[-1]), keep.view(-1, p.shape[-1])
    for r in range(flat_p.shape[0]):
        mass = 0.0
        for j in sorted(range(flat_p.shape[1]), key=lambda c: -float(flat_p[r, c])):
            if threshold >= 1.0 or mass < threshold:
                flat_k[r, j] = True
            mass += float(flat_p[r, j])
    return keep


def cdf_keep_rows_ties(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """The CDF rule with exactly tied probabilities decided together, in float64, row by row: a group
    of equal entries is kept iff the mass of all entries larger than them is < threshold."""
    keep = torch.zeros_like(p, dtype=torch.bool)
    flat_p, flat_k = p.double().reshape(-1, p.shape[-1]), keep.view(-1, p.shape[-1])
    for r in range(flat_p.shape[0]):
        row = [float(x) for x in flat_p[r]]
        for j, x in enumerate(row):
            larger = sum(y for y in row if y > x)
            flat_k[r, j] = threshold >= 1.0 or (larger < threshold and threshold > 0.0)
    return keep


def mass_before_rows(p: torch.Tensor) -> torch.Tensor:
    """float64 mass of the entries ranked before each entry (descending order, ties in index order)."""
    out = torch.zeros_like(p, dtype=torch.float64)
    flat_p, flat_o = p.double().reshape(-1, p.shape[-1]), out.view(-1, p.shape[-1])
    for r in range(flat_p.shape[0]):
        mass = 0.0
        for j in sorted(range(flat_p.shape[1]), key=lambda c: (-float(flat_p[r, c]), c)):
            flat_o[r, j] = mass
            mass += float(flat_p[r, j])
    return out


def nabla_keep(q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, grid, threshold: float) -> tuple[torch.Tensor, float]:
    """NABLA keep mask from raster-order q/k in float64, and the smallest |mass - threshold| margin
    seen at a decision (so a test can tell a real mismatch from a float32 rounding tie)."""
    ids = tile_ids(*grid)
    n = int(ids.max()) + 1
    q, k = q_BHSD.double(), k_BHSD.double()
    onehot = torch.zeros(len(ids), n, dtype=torch.float64)
    onehot[torch.arange(len(ids)), ids] = 1.0
    onehot /= onehot.sum(0, keepdim=True)
    qp = torch.einsum("bhsd,sn->bhnd", q, onehot)
    kp = torch.einsum("bhsd,sn->bhnd", k, onehot)
    p = torch.softmax(qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    keep = cdf_keep_rows(p, threshold)
    cum = torch.sort(p, dim=-1, descending=True).values.cumsum(-1)
    margin = float((cum - threshold).abs().min()) if threshold < 1.0 else 1.0
    return keep, margin


def masked_attention_f64(q_BHSD, k_BHSD, v_BHSD, token_keep_BHSS: torch.Tensor) -> torch.Tensor:
    s = (q_BHSD.double() @ k_BHSD.double().transpose(-1, -2)) / math.sqrt(q_BHSD.shape[-1])
    s = s.masked_fill(~token_keep_BHSS, float("-inf"))
    return torch.softmax(s, dim=-1) @ v_BHSD.double()


class ReferenceProcessor:
    """A Wan self-attention processor computing masked attention in float64 on raster tokens,
    with the NABLA/STA keep mask built by the brute-force rules above."""

    def __init__(self, attention: dict, grid_from, time_pairs: bool = False):
        self.attention = attention
        self.time_pairs = time_pairs  # 128-token query blocks of time-paired tiles (OR over the pair)
        self.grid_from = grid_from  # callable -> (frames, height, width) patch grid of the current call
        self.margins: list[float] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        cos, sin = rotary_emb

        def rot(x):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            c, s = cos[..., 0::2], sin[..., 1::2]
            return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2).type_as(x)

        dev = hidden_states.device  # the float64 reference runs on the CPU, whatever the model's device
        q, k = rot(q).transpose(1, 2).cpu(), rot(k).transpose(1, 2).cpu()
        v = v.transpose(1, 2).cpu()
        grid = self.grid_from()
        ids = tile_ids(*grid)
        a = self.attention
        b, h = q.shape[:2]
        n = int(ids.max()) + 1
        keep = torch.zeros(b, h, n, n, dtype=torch.bool)
        if a["type"] in ("nabla", "nabla_sta"):
            nk, margin = nabla_keep(q, k, grid, a["threshold"])
            self.margins.append(margin)
            keep |= nk
        if a["type"] in ("sta", "nabla_sta"):
            keep |= sta_keep(*grid, a["sta_window"])
        if self.time_pairs:
            groups = time_pair_groups(*grid)
            counts = torch.zeros(b, h, int(groups.max()) + 1, n).index_add_(2, groups, keep.float())
            keep = (counts > 0)[:, :, groups]  # a block keeps a key tile iff any of its tiles does
        token_keep = keep[:, :, ids][:, :, :, ids]
        out = masked_attention_f64(q, k, v, token_keep).to(dev, q.dtype)
        out = out.transpose(1, 2).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def install_reference(transformer, attention: dict, time_pairs: bool = False) -> list:
    """Put ReferenceProcessor on every attn1; returns the originals for restoring."""
    p_t, p_h, p_w = transformer.config.patch_size
    state = {}

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        state["grid"] = (x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w)

    hook = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    proc = ReferenceProcessor(attention, lambda: state["grid"], time_pairs)
    originals = [blk.attn1.processor for blk in transformer.blocks]
    for blk in transformer.blocks:
        blk.attn1.processor = proc

    def restore():
        hook.remove()
        for blk, p in zip(transformer.blocks, originals, strict=False):
            blk.attn1.processor = p

    return proc, restore


# ---- flash-attn-4 imitation (CPU tests of wan_nabla/attention/backends/fa4.py) ------------------------------
class BlockSparseTensorsImitation:
    """Stands in for flash_attn.cute.block_sparsity.BlockSparseTensorsTorch (keyword fields)."""

    def __init__(self, mask_block_cnt, mask_block_idx, full_block_cnt=None, full_block_idx=None, block_size=None):
        self.mask_block_cnt, self.mask_block_idx = mask_block_cnt, mask_block_idx
        self.full_block_cnt, self.full_block_idx = full_block_cnt, full_block_idx
        self.block_size = block_size


def key_valid_mask_imitation(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """The torch twin of fa4_mask.key_valid_mask: keep a key iff aux_tensors[0][kv] == 1."""
    return aux_tensors[0][kv_idx] == 1


def flash_attn_func_imitation(
    q, k, v, *, softmax_scale=None, mask_mod=None, aux_tensors=None, block_sparse_tensors=None, **unused
):
    """flash-attn-4's forward in float64, as the b36 code reads (q/k/v [B, S, H, D]; returns (out, None)):
    - without block tables every key is visited (mask_mod, if any, on every element);
    - with them, per (batch, head, query block) the "mask" list and then the "full" list are walked
      from entry cnt-1 down to 0; mask_mod applies on mask blocks only; only the FIRST block processed
      from each list is bounds-checked (keys >= S_k -> -inf); in later blocks a key past the end is
      read as TMA's zero fill (score 0, value 0), so an unsorted list gives wrong results here as
      it would on the GPU. Rows with no visited key give 0."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    bst = block_sparse_tensors
    bkv = bst.block_size[1] if bst is not None else sk
    nk = -(-sk // bkv) * bkv
    kz = torch.zeros(b, nk, h, d, dtype=torch.float64)
    vz = torch.zeros(b, nk, h, v.shape[-1], dtype=torch.float64)
    kz[:, :sk], vz[:, :sk] = k.double(), v.double()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kz) * scale  # [B, H, Sq, Nk]
    allowed = torch.zeros(b, h, sq, nk, dtype=torch.bool)
    kv = torch.arange(nk)

    def mod(bi, hi, rows, cols, wrap=True):
        # FA4 wraps key indices mod S_k before the mask_mod only in the bounds-checked block; a read
        # past the aux tensor elsewhere would be garbage: counted as "keep" so such a bug shows.
        if mask_mod is None:
            return torch.ones(len(rows), len(cols), dtype=torch.bool)
        cols = cols % sk if wrap else cols
        inside = cols < len(aux_tensors[0])
        keep = mask_mod(bi, hi, rows[:, None], cols.clamp(max=len(aux_tensors[0]) - 1)[None, :], None, aux_tensors)
        return keep.expand(len(rows), len(cols)) | ~inside[None, :]

    if bst is None:
        allowed[:, :, :, :sk] = True
        if mask_mod is not None:
            for bi in range(b):
                for hi in range(h):
                    allowed[bi, hi] = allowed[bi, hi] & torch.nn.functional.pad(
                        mod(bi, hi, torch.arange(sq), kv[:sk]), (0, nk - sk)
                    )
    else:
        bq = bst.block_size[0]
        lists = [(bst.mask_block_cnt, bst.mask_block_idx, True)]
        if bst.full_block_cnt is not None:
            lists.append((bst.full_block_cnt, bst.full_block_idx, False))
        for bi in range(b):
            for hi in range(h):
                for m in range(-(-sq // bq)):
                    rows = torch.arange(m * bq, min((m + 1) * bq, sq))
                    for cnt, idx, masked in lists:
                        c = int(cnt[min(bi, cnt.shape[0] - 1), min(hi, cnt.shape[1] - 1), m])
                        order = idx[min(bi, idx.shape[0] - 1), min(hi, idx.shape[1] - 1), m, :c].tolist()
                        for pos, n in enumerate(reversed(order)):
                            cols = kv[n * bkv : (n + 1) * bkv]
                            ok = (
                                mod(bi, hi, rows, cols, wrap=pos == 0)
                                if masked
                                else torch.ones(len(rows), len(cols), dtype=torch.bool)
                            )
                            if pos == 0:  # the bounds-checked block
                                ok = ok & (cols < sk)[None, :]
                            allowed[bi, hi, rows[:, None], cols[None, :]] |= ok
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with nothing visited -> 0
    out = torch.einsum("bhqk,bkhd->bqhd", p, vz)
    return out.to(q.dtype), None


def token_keep_from_blocks(blocks_BHmn: torch.Tensor, block_size, s_pad: int, valid: torch.Tensor) -> torch.Tensor:
    """[B, H, S_pad, S_pad] bool: token pairs inside kept blocks whose key is a real token."""
    bq, bkv = block_size
    rows = torch.arange(s_pad) // bq
    cols = torch.arange(s_pad) // bkv
    return blocks_BHmn[:, :, rows][:, :, :, cols] & valid[None, None, None, :]
