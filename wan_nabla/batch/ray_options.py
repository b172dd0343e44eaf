"""The --engine ray options of `wan-nabla batch`, checked before anything is planned.

    opts = ray_options(request)      # requests.BatchRequest -> RayOptions (UsageError on bad values)
    opts.check(cfg)                  # settings a Ray batch cannot run

Kept apart from ray_engine.py so that preflight checks them without importing the runner (which
imports the app and torch). Limits: ray itself is only looked up (importlib.metadata), not imported.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

log = logging.getLogger("wan_nabla.batch.ray_engine")

RAY_REQUIREMENT = "ray>=2.60,<2.61"
"""The tested range; keep it equal to the `ray` extra in pyproject.toml."""


@dataclass(frozen=True)
class RayOptions:
    """The --engine ray options (checked in one place: ray_options)."""

    address: str | None = None
    """A running cluster (host:port or "auto"); None: RAY_ADDRESS, else a new local cluster."""
    actors: int | None = None
    """Pipelines to run; None: one per GPU of the cluster, 2 when it has no GPU."""
    max_retries: int = 2
    """How often an item whose actor died is run again on another actor."""
    transfer: bool = False
    """Actors return the files and the driver writes them (--out-dir not shared between nodes)."""
    verbose: bool = False
    """Show the actors' own output (Ray's log_to_driver); off by default, their failures come back
    in the manifest records."""

    def check(self, cfg) -> None:
        """UsageError for settings a Ray batch cannot run (module doc: Limits)."""
        if cfg.parallel.group_size > 1 or os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
            raise UsageError(
                "--engine ray runs one pipeline per actor: it does not combine with torchrun, "
                "--ulysses-degree or --cfg-parallel; use --engine local for those"
            )
        device = cfg.generation.device
        if device.startswith("cuda:"):
            raise UsageError(
                f"--device {device}: under --engine ray each actor is given its own GPU; use --device cuda or auto"
            )


def ray_options(req: Any) -> RayOptions:
    """RayOptions of a requests.BatchRequest; UsageError for a bad value or when ray is not
    installed (before anything is planned)."""
    actors, retries = req.ray_actors, req.max_retries
    if actors is not None and actors < 1:
        raise UsageError(f"--ray-actors: {actors} is not allowed; use at least 1")
    if retries is not None and retries < 0:
        raise UsageError(f"--max-retries: {retries} is not allowed; use 0 or more")
    try:
        version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            "--engine ray: ray is not installed; pip install 'wan-nabla[ray]' "
            f"({RAY_REQUIREMENT}) on the driver and on every node"
        ) from None
    if not version.startswith("2."):
        log.warning("ray %s is outside the tested range %s", version, RAY_REQUIREMENT)
    return RayOptions(
        address=req.ray_address or None,
        actors=actors,
        max_retries=2 if retries is None else retries,
        transfer=bool(req.ray_transfer),
        verbose=bool(req.flags.verbose),
    )
