"""`wan-nabla generate --save-masks`: pictures of that run's kept tile masks, next to the MP4.

    saver = MaskSaver.prepare(cfg, Path("out/fox.mp4"), plan.sampling)   # preflight checked the input
    saver.attach(gen)                                           # the probe on the loaded generator
    result = gen.generate(prompt)                               # masks are recorded on the way
    saver.write(result)                                         # out/fox_masks/*.png

Writes into `<output stem>_masks/` (created if needed; existing pictures of the same name are
replaced, each file atomically): `stepSSS_layerLL.png` for every sampled (step, layer), one panel
per sampled head, and `density.png`, the kept-block density of every layer and step. The sampled
steps, layers and heads come from --sample-steps / --sample-layers / --sample-heads (defaults:
first sparse step, middle and last step; first, middle and last block and head). Only masks are
recorded (no exact attention: that is `wan-nabla compare`), so the run costs one extra tile mask
per sampled call. Pictures: pictures.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..output.files import atomic_write_bytes, ensure_writable_dir
from .options import require_extras, resolve_sampling
from .probe import AttentionProbe
from .report import is_random_model


def masks_dir(output: Path) -> Path:
    """fox.mp4 -> fox_masks/ beside it."""
    return output.with_name(f"{output.stem}_masks")


class MaskSaver:
    def __init__(self, cfg: RunConfig, directory: Path, wanted: dict[str, Any]):
        self.cfg = cfg
        self.directory = directory
        self.wanted = wanted
        self.probe: AttentionProbe | None = None
        self.layers = 0
        self.model_id = ""

    @classmethod
    def prepare(cls, cfg: RunConfig, output: Path, wanted: dict[str, Any]) -> MaskSaver:
        """After preflight (sparse config, directory, --sample-* syntax): the packages it needs."""
        require_extras("--save-masks")
        return cls(cfg, masks_dir(output), wanted)

    def attach(self, gen) -> None:
        transformer = gen.pipe.transformer
        g = self.cfg.generation
        sampling = resolve_sampling(self.wanted, transformer, g.steps, self.cfg.attention.dense_steps)
        self.layers = len(transformer.blocks)
        self.model_id = gen.model_id
        self.probe = AttentionProbe(gen.handle.run, sampling, exact=False)

    def write(self, result) -> list[Path]:
        from .pictures import mask_pictures

        self.probe.close()
        steps = len(result.timings["per_step_s"])
        label = self.cfg.attention.label() + (" (random weights)" if is_random_model(self.model_id) else "")
        pngs = mask_pictures(self.probe.records, self.probe.density_table(self.layers, steps), label)
        ensure_writable_dir(self.directory)
        return [atomic_write_bytes(self.directory / name, data) for name, data in sorted(pngs.items())]
