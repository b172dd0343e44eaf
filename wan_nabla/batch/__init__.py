"""`wan-nabla batch`: prompt files (prompts.py), planning (plan.py), the manifest (manifest.py),
resume (resume.py), one item (item.py), the run itself (run.py) and its engine across nodes (ray_engine.py, Ray
imported only there). Entry point: `run_batch(args)`."""

from .run import run_batch

__all__ = ["run_batch"]
