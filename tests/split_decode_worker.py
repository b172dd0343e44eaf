"""torchrun worker of tests/test_split_decode.py: every rank runs split_tiled_decode on the same
latents (gloo, CPU); rank 0 saves the assembled video as .npy (no pickles)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from wan_nabla.distributed.decode import split_tiled_decode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_split_decode import LATENT_SHAPE, small_tiles_vae  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    vae = small_tiles_vae()
    z = torch.randn(*LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    ranks = list(range(dist.get_world_size()))
    with torch.no_grad():
        video = split_tiled_decode(vae, z, dist.group.WORLD, ranks)
    if dist.get_rank() == 0:
        np.save(out, video.numpy())
    else:
        assert video is None
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
