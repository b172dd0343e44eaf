"""The sampler's schedule and the guided prediction: Wan2.1's, run by diffusers' own schedulers.

    sched = make_scheduler(pipe.scheduler, shift=5.0, sampler="unipc")
    set_timesteps(sched, 50, device)         # Wan's FlowUniPC sigmas, handed to diffusers' UniPC
    schedule_record(sched)                   # {"sigmas": [...51], "timesteps": [...50]} for the sidecar
    noise = guide(cond, uncond, 5.0)         # float32: uncond + g * (cond - uncond)
    sampler_runs(WAN_SCHEDULER_CONFIG, 300, 5.0)   # False: this count fails in diffusers' UniPC

UniPC (Wan's default): Wan2.1's FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py) is
built with shift 1, so its sigma_max is float32(1 - 1/1000) = 0.999 and sigma_min 0; set_timesteps
takes sigma = linspace(sigma_max, 0, N + 1)[:-1], shifts it by s*sigma / (1 + (s - 1)*sigma),
appends a final sigma 0 and truncates sigma*1000 to int64 timesteps. diffusers' UniPC with
`use_flow_sigmas` starts at 1.0 instead (27 of 50 timesteps differ by up to 4 at shift 5), but it
accepts `sigmas=`, applies its `flow_shift` to them with the same formula in the same float64
order, and truncates the same way, so the unshifted linspace is all this module hands it: the
solver itself (order 2, bh2, x0 prediction, lower-order final steps) is diffusers'.
Euler (step-distilled LoRAs): sigmas 1 - i/N before the shift (4 steps: timesteps 1000, 750, 500,
250 before, 1000, 937.5, 833.3, 625 after shift 5), LightX2V's schedule, unchanged.

Guidance: the transformer's predictions are upcast to float32 once and combined there, as Wan's
fp32 head and guidance do; the error of a bf16 combination would be multiplied by g. The
scheduler steps float32 latents; the only cast back is the latents to the transformer's dtype at
its next call.

Limits: flow-matching UniPC and Euler only (the schedulers of Wan2.1 T2V and its distilled LoRAs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

WAN_SIGMA_MAX = float(np.float32(1.0 - 1.0 / 1000))
"""Wan's FlowUniPC sigma_max: its float32 training sigmas (1 - linspace(1, 1/1000, 1000)) start at
float32(0.999), which `.item()` reads back as 0.99900001287..."""


def wan_unshifted_sigmas(steps: int) -> np.ndarray:
    """linspace(sigma_max, 0, steps + 1)[:-1] in float64: Wan's FlowUniPC sigmas before the shift."""
    return np.linspace(WAN_SIGMA_MAX, 0.0, steps + 1)[:-1].copy()


def make_scheduler(base, shift: float, sampler: str = "unipc"):
    """A fresh scheduler with flow shift `shift`: a copy of `base` (the pipeline's UniPC, or any
    scheduler with a config) for unipc, first-order flow-matching Euler for euler."""
    if sampler == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=base.config.num_train_timesteps, shift=shift)
    return type(base).from_config(base.config, flow_shift=shift)


def set_timesteps(scheduler, steps: int, device: torch.device | str | None = None) -> None:
    """Wan's FlowUniPC schedule (UniPC) or the distilled LoRAs' Euler schedule (module doc)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], device=device)
    elif getattr(scheduler.config, "use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=wan_unshifted_sigmas(steps), device=device)
    else:  # not a flow-matching UniPC: its own schedule (no Wan checkpoint ships one)
        scheduler.set_timesteps(steps, device=device)


def schedule_record(scheduler) -> dict[str, list[float]]:
    """The sigmas (steps + 1, the last 0) and timesteps (steps) a scheduler will run, as lists."""
    return {
        "sigmas": [float(x) for x in scheduler.sigmas.flatten().tolist()],
        "timesteps": [float(x) for x in scheduler.timesteps.flatten().tolist()],
    }


def guide(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """uncond + g * (cond - uncond) in float32 (module doc)."""
    c, u = cond.float(), uncond.float()
    return u + guidance_scale * (c - u)


def sampler_runs(scheduler_config: Mapping[str, Any], steps: int, shift: float) -> bool:
    """False iff diffusers' scheduler would fail to run `steps` at `shift`, decided without a model.

    UniPCMultistepScheduler finds its start with index_for_timestep(timesteps[0]), which takes the
    *second* match when the first timestep occurs twice; the run then ends one index past the
    schedule, and `step` fails (`assert self.this_order > 0`) at the last step. Integer timesteps
    coincide when sigma_1 truncates to sigma_0's timestep (999). Schedulers without that lookup
    are assumed to run."""
    cls = getattr(diffusers, str(scheduler_config.get("_class_name", "")), None) or diffusers.UniPCMultistepScheduler
    sched = cls.from_config(dict(scheduler_config), flow_shift=shift)
    find = getattr(sched, "index_for_timestep", None)
    if find is None:
        return True
    set_timesteps(sched, steps)
    return int(find(sched.timesteps[0])) == 0
