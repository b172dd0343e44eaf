"""Tests of wan_nabla/output/."""
