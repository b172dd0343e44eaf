"""The bundled attention presets, found by name from anywhere.

    resolve_config_path("nabla_0.7")          # <checkout>/configs/nabla_0.7.yaml (or the installed copy)
    resolve_config_path("nabla_0.7.yaml")     # the same, unless ./nabla_0.7.yaml exists
    resolve_config_path("my/own.yaml")        # a path is returned as it is
    list_presets()                            # [("full", "Dense baseline: ..."), ...]

Rule: a path that exists always wins. Otherwise a bare name (no directory part), with or without
".yaml"/".yml", that names a bundled preset resolves to it. Anything else is returned unchanged,
so loading it reports the missing file (and the preset names). Each preset's first comment line
is its one-line description.

Where they live: the repository's top-level `configs/` (one YAML per preset) is the only source.
A wheel or `pip install .` copies it into this package at build time (setup.py's build_py), so an
installed package reads its own copy; a checkout (editable install, PYTHONPATH) has no copy here
and reads `configs/` itself. tests/test_house.py checks the two are the same files.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CHECKOUT_CONFIGS = _HERE.parents[1] / "configs"


def _preset_dir() -> Path:
    """The installed copy when the build put one here, else the checkout's configs/."""
    if any(_HERE.glob("*.yaml")) or not _CHECKOUT_CONFIGS.is_dir():
        return _HERE
    return _CHECKOUT_CONFIGS


PRESET_DIR = _preset_dir()
_SUFFIXES = (".yaml", ".yml")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path | None:
    """The bundled preset called `name` (with or without .yaml), or None."""
    stem = name[: -len(s)] if (s := next((x for x in _SUFFIXES if name.endswith(x)), "")) else name
    path = PRESET_DIR / f"{stem}.yaml"
    return path if stem and stem in preset_names() else None


def resolve_config_path(spec: str | Path) -> Path:
    """A config path for `spec`: the path itself if it exists, else the bundled preset of that name."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if "/" not in text and "\\" not in text:
        found = preset_path(text)
        if found is not None:
            return found
    return path


def describe(path: Path) -> str:
    """The first comment line of a preset file, without '#'."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def list_presets() -> list[tuple[str, str]]:
    """(name, one-line description) of every bundled preset, sorted by name."""
    return [(name, describe(PRESET_DIR / f"{name}.yaml")) for name in preset_names()]
