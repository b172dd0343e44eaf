"""The Docker image serves too: the serve extra is installed, port 8000 is exposed, and the
HEALTHCHECK runs the stdlib probe (wan_nabla.serve.healthcheck) that passes for `generate`
containers (no health file) and follows /health for `serve` containers (tests/serve/test_api.py
runs it against a live server)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.support import ROOT
from tests.support.dockerfile import DOCKERFILE, parse_dockerfile


def _instructions():
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_image_has_a_healthcheck_that_passes_without_a_server():
    ins = _instructions()
    checks = [a for k, a in ins if k == "HEALTHCHECK"]
    assert len(checks) == 1
    script = checks[0].split('"python", "')[1].split('"')[0]
    workdir = next(a for k, a in ins if k == "WORKDIR")  # where `COPY wan_nabla ./wan_nabla` puts the sources
    assert script.startswith(workdir + "/") and any(k == "COPY" and a == "wan_nabla ./wan_nabla" for k, a in ins)
    local = ROOT / script[len(workdir) + 1 :]
    assert local.is_file()
    assert re.search(r"--start-period=\d+m", checks[0])  # loading a 14B model takes minutes
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "WAN_NABLA_HEALTH_FILE=" in env
    assert any(k == "EXPOSE" and a == "8000" for k, a in ins)
    assert any(k == "RUN" and re.search(r'pip install .*"\.\[[\w,-]*serve[\w,-]*\]"', a) for k, a in ins)
    # the `generate` container: no server, the check passes (exit 0), on the standard library alone
    r = subprocess.run(
        [sys.executable, "-I", "-X", "importtime", str(local)],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "WAN_NABLA_HEALTH_FILE": "/nonexistent/health"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    heavy = re.findall(r"\|\s+((?:torch|wan_nabla)(?:\.\S+)?)$", r.stderr, re.M)  # -X importtime: every import
    assert not heavy, heavy
