"""Tests of wan_nabla/serve/."""
