"""Tests of wan_nabla/distributed/."""
