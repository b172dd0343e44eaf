"""Block-sparse attention for video diffusion transformers, as a library: it imports nothing from
the rest of wan_nabla (tests/test_house.py checks it).

    from wan_nabla.attention.config import AttentionConfig       # the typed config (no torch)
    from wan_nabla.attention.run import AttentionRun, tile_layout
    run = AttentionRun(AttentionConfig(type="nabla", threshold=0.7))
    run.layout = tile_layout(frames=2, height=16, width=16, time_pairs=False)   # latent patch grid
    out_BHSD = run.attend(q_BHSD, k_BHSD, v_BHSD, layer=0)     # tokens in tile order (layout.to_tiles)
    run.density_summary()                                        # kept share of blocks, per step/layer

config.py (AttentionConfig and the config-vs-model rules), layout.py (tiles, padding), masks.py
(NABLA and STA block plans), triton/ (the mask kernels), rotary.py (rotation with fused tile
pooling), backends/ (flex and flash-attn-4 behind one select()), run.py (per-forward state, the
chosen backend, statistics and their observers). The package import itself is light: nothing is
imported until a submodule is.
"""
