"""Memory modes: where the pipeline's components live while a video is made (diffusers' own hooks).

    handle = apply_memory(pipe, MemoryConfig(offload="group"), torch.device("cuda"))
    ...                                   # encode / denoise / decode as usual: the hooks move weights
    handle.before_decode(1280, 720, 81)   # VAE tiling as configured for this video (and free memory)
    handle.after_video()                  # model mode: every component back on the CPU
    handle.remove()                       # hooks gone; offloaded components stay on the CPU

The modes (`memory.offload`, `--offload`); the text encoder is UMT5-XXL (11.4 GB in bf16), the
14B transformer 28.6 GB, the VAE 0.5 GB (fp32):
- none: every component on the device (as loaded); nothing is installed. Fastest, most memory.
- model: diffusers' `enable_model_cpu_offload` (accelerate hooks, chain text encoder ->
  transformer -> VAE): a component moves to the device when it is called and the one before it
  goes back to the CPU, so the text encoder is off the device before the transformer arrives.
  After each video everything returns to the CPU (`maybe_free_model_hooks`). Peak: the largest
  component plus its activations; the transformer moves once per video, steps run at full speed.
- group: diffusers group offloading. Transformer at block level, one block per group; on CUDA the
  next block is copied from pinned CPU memory on a side stream while the current one computes
  (`use_stream`, `record_stream`). Patch embedding, condition embedder and head form one group that
  stays on the device for the whole forward. Text encoder at block level too, which for UMT5 (no
  ModuleList child) is a single group: on the device during encoding only. The VAE moves to the
  device for decoding and back after it (0.5 GB that a 12 GB card needs while encoding).
- sequential: lowest memory. Group offloading at leaf level for the transformer and the text
  encoder (every Linear / norm / embedding moves on its own, prefetched on a stream on CUDA); the
  VAE as in group, with tiling. accelerate's `enable_sequential_cpu_offload` is not used: it fails
  inside UMT5 with accelerate 1.15 + transformers 5 (tied embedding), and it is slower.

VAE tiling (`memory.vae_tiling`): AutoencoderKLWan.enable_tiling (256-px tiles, 192-px stride,
blended seams; frames still decode one latent frame at a time). `auto`: always in group /
sequential modes; otherwise, on CUDA, untiled when the untiled decode's measured need
(VAE_DECODE_GIB_PER_MPIXEL_FRAME x width x height x frames, x VAE_DECODE_MARGIN) fits in the
device's free memory plus what PyTorch's allocator holds unused (the need per memory.vae_dtype:
VAE_DECODE_GIB_PER_MPIXEL_FRAME_BY_DTYPE), tiled when it does not; without
a CUDA device to ask, from VAE_TILING_AUTO_PIXELS per frame. Should an untiled decode still run
out of memory, the pipeline decodes again with tiling (the video is not lost). Tiling changes
decoded pixels slightly (blending); the latents never depend on the memory mode. VAE slicing is
not offered: it splits a batch, and wan-nabla decodes one video at a time.

Limits: group / sequential pin a CPU copy of the transformer (host RAM: about twice the
transformer until the first step, then once); model mode needs accelerate. Forward hooks of
adapter.py keep working under every mode (they read module outputs, never weights).
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, apply_group_offloading

from .config import MemoryConfig

# `vae_tiling: auto` without a CUDA device to ask (module doc): frames with at least this many
# pixels are decoded tiled. Measured on an H100 (benchmarks/results/memory.md, 1280x720x81):
# untiled decode needs 20.2 GiB on top of what is resident, tiled 3.9 GiB, at 8.6 s vs 14.5 s.
VAE_TILING_AUTO_PIXELS = 1280 * 720
# Extra memory of an untiled decode per million pixel-frames (GiB): 20.2 GiB at 1280x720x81 and 8.8
# GiB at 832x480x81 on an H100 (benchmarks/results/memory.md): 0.271 and 0.272, linear in the
# video's pixels. The margin covers allocator rounding and fragmentation.
VAE_DECODE_GIB_PER_MPIXEL_FRAME = 0.272
# The same per memory.vae_dtype, from the linear fit of the H200 decode runs at 1280x720x81 and
# 832x480x81 (benchmarks/results/h200_decode.json, `need`): fp32 0.271 (the H100 figure above is
# kept), bf16 0.135.
VAE_DECODE_GIB_PER_MPIXEL_FRAME_BY_DTYPE = {"fp32": VAE_DECODE_GIB_PER_MPIXEL_FRAME, "bf16": 0.135}
VAE_DECODE_MARGIN = 1.25
# The hook names diffusers' group offloading registers (hooks/group_offloading.py); its own
# re-apply path removes exactly these three.
_GROUP_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
_CPU = torch.device("cpu")


def untiled_decode_gib(width: int, height: int, frames: int, vae_dtype: str = "fp32") -> float:
    """The measured extra memory of an untiled VAE decode of this video (module doc), in GiB."""
    return VAE_DECODE_GIB_PER_MPIXEL_FRAME_BY_DTYPE[vae_dtype] * width * height * frames / 1e6


def free_device_gib(device: torch.device) -> float:
    """Free memory of a CUDA device plus what PyTorch's caching allocator holds unused, in GiB."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) / 2**30


def vae_tiling_on(
    memory: MemoryConfig,
    width: int,
    height: int,
    frames: int | None = None,
    device: torch.device | None = None,
    free_gib: float | None = None,
) -> bool:
    """Whether a width x height x frames video is decoded tiled under this memory config (module
    doc): with `frames`, auto checks for room in `free_gib` (given, e.g. a card's memory for an
    estimate) or else asks a CUDA `device`; without either, the pixel rule."""
    if memory.vae_tiling != "auto":
        return memory.vae_tiling == "on"
    if memory.offload in ("group", "sequential"):
        return True
    if frames is not None and free_gib is None and device is not None and device.type == "cuda":
        free_gib = free_device_gib(device)
    if frames is not None and free_gib is not None:
        return untiled_decode_gib(width, height, frames, memory.vae_dtype) * VAE_DECODE_MARGIN > free_gib
    return width * height >= VAE_TILING_AUTO_PIXELS


class MemoryHandle:
    """What apply_memory returns: per-video calls and a way to take the hooks off again."""

    def __init__(self, pipe, memory: MemoryConfig, device: torch.device, grouped: tuple = ()):
        self.pipe = pipe
        self.memory = memory
        self.device = device
        self._grouped = grouped
        self.active = True

    def before_decode(self, width: int, height: int, frames: int | None = None) -> bool:
        """Set VAE tiling for this video (and bring the VAE in); returns whether tiling is on."""
        on = vae_tiling_on(self.memory, width, height, frames, self.device)
        self.pipe.vae.enable_tiling() if on else self.pipe.vae.disable_tiling()
        if self.memory.offload in ("group", "sequential"):
            self.pipe.vae.to(self.device)
        return on

    def after_video(self) -> None:
        """Everything that offloading keeps off the device goes back to the CPU."""
        if self.memory.offload == "model":
            self.pipe.maybe_free_model_hooks()
        elif self.memory.offload in ("group", "sequential"):
            self.pipe.vae.to(_CPU)

    def remove(self) -> None:
        """Take the hooks off. Offloaded components end on the CPU; mode none leaves placement alone."""
        if not self.active:
            return
        self.active = False
        mode = self.memory.offload
        if mode == "none":
            return
        if mode == "model":
            self.pipe.remove_all_hooks()
        else:
            for module in self._grouped:
                registry = HookRegistry.check_if_exists_or_initialize(module)
                for name in _GROUP_HOOKS:
                    registry.remove_hook(name, recurse=True)
        for name in ("text_encoder", "transformer", "vae"):
            getattr(self.pipe, name).to(_CPU)


def apply_memory(pipe, memory: MemoryConfig, device: torch.device) -> MemoryHandle:
    """Place the pipeline's components for `memory.offload` on `device` (see module doc).
    Call after wan.hooks.apply_attention; offload modes expect the components on the CPU."""
    device = torch.device(device)
    mode = memory.offload
    if mode == "none":
        pipe.to(device)
        return MemoryHandle(pipe, memory, device)
    if mode == "model":
        try:
            pipe.enable_model_cpu_offload(device=device)
        except ImportError as e:  # accelerate is a dependency, but a trimmed install may lack it
            raise RuntimeError(f"memory.offload 'model' needs accelerate ({e}); pip install accelerate") from None
        return MemoryHandle(pipe, memory, device)

    stream = device.type == "cuda"
    kw = dict(onload_device=device, offload_device=_CPU)
    streamed = dict(use_stream=stream, record_stream=stream, non_blocking=stream)
    if mode == "group":
        apply_group_offloading(pipe.transformer, offload_type="block_level", num_blocks_per_group=1, **kw, **streamed)
        # One group for the whole encoder: a stream has nothing to prefetch, and pinning would
        # keep a second host copy of 11 GB.
        apply_group_offloading(pipe.text_encoder, offload_type="block_level", num_blocks_per_group=1, **kw)
    else:  # sequential
        apply_group_offloading(pipe.transformer, offload_type="leaf_level", **kw, **streamed)
        apply_group_offloading(pipe.text_encoder, offload_type="leaf_level", **kw, **streamed)
    pipe.vae.to(_CPU)
    return MemoryHandle(pipe, memory, device, grouped=(pipe.transformer, pipe.text_encoder))
