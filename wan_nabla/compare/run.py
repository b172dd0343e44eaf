"""`wan-nabla compare`: the same prompt, seed and initial noise through two attention configs.

    wan-nabla compare --prompt "a red fox in the snow" --config nabla_0.4 --out cmp/
    wan-nabla compare --prompt "..." --config mine.yaml --against nabla_0.7 --model weights/... --out cmp2/
    wan-nabla compare --prompt "..." --config nabla_0.7 --against-geometry fast --out cmp3/   # exact vs fast blocks
    ref = capture(pipe, ref_cfg, device, "tiny", prompt, keep_noise=True)       # library use
    cand = capture(pipe, cand_cfg, device, "tiny", prompt, reference=ref, probe=(sampling, True))

One pipeline is loaded (with the reference's attention), the reference video is generated, its
attention is removed and the candidate's installed on the same pipeline, and the candidate video
is generated with the same generation settings (the candidate config's `generation:` section and
the flags; the `--against` config contributes only its attention; `--against-geometry G` makes
the reference the candidate's own attention at kernel geometry G, exact or fast). Same seed, so the same
initial noise (drawn on the CPU). During the reference run the guided noise prediction of every
step is kept on the device; during the candidate run each step's prediction is compared with it
(relative L2), the probe (probe.py) watches the candidate's attention calls, and at the end the
decoded frames and final latents are compared. Both runs follow their own trajectories, so the
per-step differences include what earlier steps changed.

Outputs in --out (each written atomically; the directory is created by the run, refused when it
exists and is not empty unless --overwrite, and removed again when the run fails before writing):
side_by_side.mp4 (reference | candidate | |difference|, skipped with --no-video) and a still of
its middle frame side_by_side.png, metrics.json, attention_error.json, masks/ (the candidate's
kept tile masks at the sampled steps / layers / heads, density.png: layer x step), metrics.png,
and report.md, written last, which embeds the pictures and the numbers (report.py).

Timings: the speed-up is the ratio of median step times, the first step left out (it compiles
FlexAttention for the shape) and the probe's own time (measured between device syncs) taken out
of the candidate's steps. The reference runs first, so it also absorbs the process's warm-up.
Limits: one prompt per call; the runs are sequential on one pipeline (memory of one model);
on runs of a few steps the speed-up is indicative only (the benchmark harness in a checkout's benchmarks/ measures speed).
"""

from __future__ import annotations

import io
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from ..app import check_environment, load_generator, warn_long_prompt
from ..config import RunConfig
from ..errors import UsageError
from ..output.files import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text
from ..output.video import write_mp4
from ..pipeline import GenerationResult, VideoGenerator
from ..preflight import RunPlan
from ..requests import CompareRequest
from . import report
from .metrics import frame_metrics
from .options import claim_out_dir, remove_if_empty, require_extras, resolve_sampling
from .probe import AttentionProbe, Sampling
from .video import side_by_side

log = logging.getLogger(__name__)


@dataclass
class Capture:
    """One generation of a comparison and what was recorded on the way."""

    config: RunConfig
    result: GenerationResult
    final_latents: torch.Tensor
    noise: list[torch.Tensor] = field(default_factory=list)
    """Per-step guided noise predictions (float32, on the device) when kept (the reference)."""
    step_rel_l2: list[float] = field(default_factory=list)
    """Per step: ||noise - reference noise|| / ||reference noise|| (with a reference)."""
    probe: AttentionProbe | None = None
    probe_s: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.config.attention.label()

    def steady_step_s(self) -> float:
        """Median step time without the first step (compile) and without the probe's time."""
        per = [s - p for s, p in zip(self.result.timings["per_step_s"], self.probe_s, strict=False)]
        return statistics.median(per[1:] if len(per) > 1 else per)


@torch.no_grad()
def capture(
    pipe,
    config: RunConfig,
    device: torch.device,
    model_id: str,
    prompt: str,
    *,
    keep_noise: bool = False,
    reference: Capture | None = None,
    probe: tuple[Sampling, bool] | None = None,
    max_query_rows: int | None = None,
    progress: bool = False,
) -> Capture:
    """Generate with `config`'s attention installed on `pipe` (removed again afterwards).

    `probe` = (sampling, exact): watch the attention calls (probe.AttentionProbe)."""
    gen = VideoGenerator(pipe, config, device, model_id=model_id)
    watcher = None
    noise: list[torch.Tensor] = []
    diffs: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def on_step(i: int, pred: torch.Tensor, latents: torch.Tensor) -> None:
        pred = pred.float()
        if keep_noise:
            noise.append(pred.clone())
        if reference is not None:
            ref = reference.noise[i]
            diffs.append(torch.stack([(pred - ref).norm(), ref.norm()]))  # read once, at the end
        last[:] = [latents]

    try:
        if probe is not None:
            kw = {"max_query_rows": max_query_rows} if max_query_rows else {}
            watcher = AttentionProbe(gen.handle.run, probe[0], exact=probe[1], **kw)
        result = gen.generate(prompt, progress=progress, on_step=on_step)
    finally:
        if watcher is not None:
            watcher.close()
        gen.close()
    steps = len(result.timings["per_step_s"])
    rel = [
        0.0 if d == 0 else (d / r if r > 0 else float("inf"))
        for d, r in (torch.stack(diffs).double().tolist() if diffs else [])
    ]
    return Capture(
        config=config,
        result=result,
        final_latents=last[0].float().clone(),
        noise=noise,
        step_rel_l2=rel,
        probe=watcher,
        probe_s=watcher.step_probe_s(steps) if watcher else [0.0] * steps,
    )


# ---- the command ---------------------------------------------------------------------------------
def _check_video_writer() -> None:
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        raise UsageError(f"side_by_side.mp4 needs ffmpeg (imageio-ffmpeg): {e}; or give --no-video") from None


def run_compare(plan: RunPlan, req: CompareRequest) -> int:
    """The `compare` subcommand after preflight (see module doc). Bad input raises a usage error (exit 2)."""
    check_environment(plan)
    require_extras("compare")
    if not req.no_video:
        _check_video_writer()
    ref_cfg, cand_cfg, wanted = plan.reference, plan.config, plan.sampling
    out = plan.output
    created = claim_out_dir(out, req.overwrite)
    try:
        base = load_generator(ref_cfg, None, plan.model)
        transformer = base.pipe.transformer
        g = cand_cfg.generation
        sampling = resolve_sampling(wanted, transformer, g.steps, cand_cfg.attention.dense_steps)
        base.close()  # the pipeline stays loaded; each capture installs its own attention
        progress = not req.flags.quiet
        log.info("reference run: %s", ref_cfg.attention.label())
        warn_long_prompt(base, req.prompt)
        ref = capture(base.pipe, ref_cfg, base.device, base.model_id, req.prompt, keep_noise=True, progress=progress)
        log.info("candidate run: %s", cand_cfg.attention.label())
        cand = capture(
            base.pipe,
            cand_cfg,
            base.device,
            base.model_id,
            req.prompt,
            reference=ref,
            probe=(sampling, True),
            max_query_rows=req.max_query_rows,
            progress=progress,
        )
        ref.noise.clear()
    except BaseException:  # bad model or sampling flag (exit 2), or a failed run: nothing written
        remove_if_empty(out, created)
        raise
    write_outputs(out, req.prompt, base, ref, cand, video=not req.no_video)
    print(out / "report.md")
    return 0


def write_outputs(
    out: Path, prompt: str, gen: VideoGenerator, ref: Capture, cand: Capture, *, video: bool
) -> dict[str, Any]:
    """Render and write every output file (report.md last); returns metrics.json's content."""
    from . import pictures  # needs matplotlib (the plot extra); checked by require_extras first

    frames = frame_metrics(ref.result.frames, cand.result.frames)
    metrics = report.metrics_record(prompt, gen.model_id, ref, cand, frames)
    attention = report.attention_record(cand)
    layers = len(gen.pipe.transformer.blocks)
    steps = len(cand.result.timings["per_step_s"])
    tag = " (random weights)" if metrics["random_weights"] else ""
    pngs = pictures.mask_pictures(cand.probe.records, cand.probe.density_table(layers, steps), cand.label + tag)
    (out / "masks").mkdir(exist_ok=True)
    for name, data in pngs.items():
        atomic_write_bytes(out / "masks" / name, data)
    atomic_write_bytes(
        out / "metrics.png",
        pictures.metrics_picture(
            metrics["steps"]["output_rel_l2"],
            frames,
            report.attention_rows(attention),
            f"{cand.label} vs {ref.label}{tag}",
        ),
    )
    sbs, scale = side_by_side(ref.result.frames, cand.result.frames, ref.label, cand.label)
    _write_png(out / "side_by_side.png", sbs[len(sbs) // 2])
    if video:
        with atomic_output(out / "side_by_side.mp4") as tmp:
            write_mp4(sbs, tmp, fps=ref.result.settings["fps"])
    metrics["side_by_side"] = {"heat_scale": scale, "video": "side_by_side.mp4" if video else None}
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "attention_error.json", attention)
    names = sorted(n for n in pngs if n != "density.png")
    atomic_write_text(out / "report.md", report.markdown(metrics, attention, names, video=video))
    return metrics


def _write_png(path: Path, frame_HW3: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(frame_HW3).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
