"""`wan-nabla compare` and `generate --save-masks`: what a sparse config changed, measured on one's
own prompt and model (run.py is the command; probe.py the attention measurements)."""
