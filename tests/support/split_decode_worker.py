"""torchrun worker of tests/distributed/test_decode.py: every rank runs split_tiled_decode on the same
latents (gloo, CPU); rank 0 saves the assembled video as .npy (no pickles). The cases (latent
shape, small-tile VAE, pipeline settings) live here so the test and its worker share one copy."""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from wan_nabla.app import with_device
from wan_nabla.config import RunConfig
from wan_nabla.distributed import ParallelContext
from wan_nabla.distributed.decode import split_tiled_decode
from wan_nabla.model_source import model_facts
from wan_nabla.pipeline import VideoGenerator
from wan_nabla.preflight import check_parallel
from wan_nabla.tiny import build_tiny_pipeline

LATENT_SHAPE = (2, 16, 3, 7, 13)
PIPELINE_CONFIG = {
    "attention": {"type": "full"},
    "memory": {"vae_tiling": "on"},
    "generation": {"dtype": "float32", "device": "cpu"},
}
PIPELINE_GENERATION = {"size": [464, 64], "frames": 5, "steps": 1}
"""464 px wide: the tiny VAE's default 256-px tiles at a 192-px stride give 1 x 3 tiles."""


def small_tiles_vae():
    """The tiny pipeline's VAE (fixed seed) with tiles small enough to cut the test latents in 15."""
    vae = build_tiny_pipeline(seed=0).vae.eval()
    vae.enable_tiling(
        tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24
    )
    return vae


def pipeline(out: str) -> None:
    """The app's own path: Ulysses 2 over the tiny model, the video decoded split over both ranks."""
    cfg = RunConfig.from_mapping({**PIPELINE_CONFIG, "parallel": {"ulysses_degree": 2}})
    plan = with_device(check_parallel(cfg, "generate", model_facts("tiny")), cfg.generation.device)
    ctx = ParallelContext.start(plan)
    gen = VideoGenerator(build_tiny_pipeline(seed=0), cfg, plan.device, "tiny", parallel=ctx)
    res = gen.generate("a fox in the snow", progress=False, **PIPELINE_GENERATION)
    gen.close()
    if ctx.is_main:
        np.save(out, res.frames)
        assert res.timings["vae_split_ranks"] == 2
    else:
        assert len(res.frames) == 0
    ctx.barrier()
    ctx.close()


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
    (pipeline if sys.argv[2:] == ["pipeline"] else main)(sys.argv[1])
