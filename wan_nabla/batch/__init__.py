"""`wan-nabla batch`: prompt files (prompts.py), planning (plan.py), the manifest (manifest.py),
resume (resume.py) and the run itself (run.py). Entry point: `run_batch(args)`."""

from .run import run_batch

__all__ = ["run_batch"]
