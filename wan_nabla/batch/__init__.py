"""`wan-nabla batch`: prompt files (prompts.py), per-item planning (plan.py), the manifest (manifest.py),
resume (resume.py), one item (item.py), the run itself (run.py) and its engine across nodes
(ray_engine.py, Ray imported only there). Entry point: `batch.run.run_batch(plan, request)`.

The package import is light (no torch): preflight reads prompt files through prompts.py before
the run is known to be valid; run.py, which loads the pipeline, is imported by the runner.
"""
