"""Tests of wan_nabla/attention/."""
