"""Tests of wan_nabla/batch/."""
