"""The split VAE decode (distributed/decode.py) equals diffusers' single-process tiled decode.

The tiny VAE with 32-px tiles at a 24-px stride (4 and 3 latents) on latents of 7 x 13 (batch 2,
3 latent frames) gives 3 x 5 = 15 tiles with smaller edge tiles, so 2 ranks hold 8 + 7 tiles and
4 ranks 4 + 4 + 4 + 3, and the leader unpacks padded tiles of different shapes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.support import ROOT
from tests.support.split_decode_worker import LATENT_SHAPE, PIPELINE_CONFIG, PIPELINE_GENERATION, small_tiles_vae
from wan_nabla.distributed.decode import assemble, decode_tile, split_tiled_decode, tile_origins


def _latents() -> torch.Tensor:
    return torch.randn(*LATENT_SHAPE, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_one_process_split_decode_equals_tiled_decode():
    """Guards: decode_tile + assemble reproduce vae.tiled_decode (tile order, blend extents, crop,
    clamp) on a grid with uneven edge tiles and batch 2; and the tiles really differ from an
    untiled decode (so the test would see a wrong blend)."""
    vae = small_tiles_vae()
    z = _latents()
    assert len(tile_origins(vae, 7, 13)) == 15
    ref = vae.tiled_decode(z, return_dict=False)[0]
    got = split_tiled_decode(vae, z)
    assert got.shape == ref.shape == (2, 3, 9, 56, 104)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    vae.disable_tiling()
    untiled = vae.decode(z, return_dict=False)[0]
    assert (untiled - ref).abs().max() > 1e-3  # blending seams change pixels: the check is not vacuous
    tiles = [decode_tile(vae, z, i, j) for i, j in tile_origins(vae, 7, 13)]
    tiles[3] = tiles[3] + 0.5  # one wrong tile must show up in the assembled video
    assert (assemble(vae, tiles, 7, 13) - ref).abs().max() > 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, ranks: int, *extra: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-port",
        str(_free_port()),
        str(ROOT / "tests" / "support" / "split_decode_worker.py"),
        *extra,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish:\n{text[-3000:]}")
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
def test_generate_under_torchrun_decodes_split_and_equals_one_process(tmp_path):
    """Guards the pipeline's use of the split decode: a Ulysses-2 generation decodes its 3 tiles on
    both ranks and rank 0's frames equal a one-process generation with tiling on."""
    from wan_nabla.config import RunConfig
    from wan_nabla.pipeline import VideoGenerator
    from wan_nabla.tiny import build_tiny_pipeline

    out = tmp_path / "frames.npy"
    _run(tmp_path, 2, str(out), "pipeline")
    gen = VideoGenerator(
        build_tiny_pipeline(seed=0), RunConfig.from_mapping(PIPELINE_CONFIG), torch.device("cpu"), "tiny"
    )
    ref = gen.generate("a fox in the snow", progress=False, **PIPELINE_GENERATION)
    gen.close()
    assert ref.timings["vae_tiling"] and ref.frames.shape == (5, 64, 464, 3)
    np.testing.assert_allclose(np.load(out, allow_pickle=False), ref.frames, rtol=0, atol=2e-5)


@pytest.mark.slow  # 30-60 s: process start-up of 2 / 4 ranks on a small CPU
@pytest.mark.parametrize("ranks", [2, 4])
def test_split_decode_over_gloo_ranks_equals_tiled_decode(tmp_path, ranks):
    """Guards: under torchrun (gloo) the ranks decode disjoint tiles (8+7 or 4+4+4+3) and rank 0
    assembles exactly what one process's tiled decode gives; the other ranks get None."""
    out = tmp_path / "video.npy"
    _run(tmp_path, ranks, str(out))
    with torch.no_grad():
        ref = small_tiles_vae().tiled_decode(_latents(), return_dict=False)[0].numpy()
    got = np.load(out, allow_pickle=False)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
