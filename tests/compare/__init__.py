"""Tests of wan_nabla/compare/."""
