"""Tests of the benchmark harness and GPU job scripts (benchmarks/), in their CPU modes."""
