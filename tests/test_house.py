"""The repository's structure: no import cycles, no private names across modules, documents that
cite only files that exist, a README layout table that matches the tree, presets shipped as
package data."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "wan_nabla"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported wan_nabla module, names taken from it) for every import in the file, function-level ones too."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("wan_nabla"):
                continue
            names = [a.name for a in node.names]
            # `from . import x` imports the submodule x
            subs = [f"{target}.{n}" for n in names if (PKG.parent / f"{target}.{n}".replace(".", "/")).with_suffix(".py").exists()
                    or (PKG.parent / f"{target}.{n}".replace(".", "/")).is_dir()]
            if subs:
                out += [(s, []) for s in subs]
            else:
                out.append((target, names))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("wan_nabla")]
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = _module_name(path)
        deps = set()
        for target, _ in _imports(path):
            # a package import runs its __init__; a module import runs that module
            deps.add(target)
        graph[mod] = deps - {mod}
    return graph


def test_no_import_cycles_between_modules():
    """Guards the layout: every module stands above what it imports (package __init__ files that
    only re-export their own submodules are allowed to import them)."""
    graph = _graph()

    def edges(mod):
        for dep in graph.get(mod, ()):
            # a package's __init__ importing its own children is not a cycle of the house
            if dep.startswith(mod + ".") and (PKG.parent / mod.replace(".", "/") / "__init__.py").exists():
                continue
            yield dep

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod):
        state[mod] = 1
        stack.append(mod)
        for dep in edges(mod):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_no_private_names_imported_across_modules():
    """Guards: modules use each other's public API only (no `from .x import _y`, no `x._y` on an
    imported wan_nabla module)."""
    bad = []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        for target, names in _imports(path):
            bad += [f"{path.relative_to(ROOT)}: from {target} import {n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
        for m in re.finditer(r"\b(masks|layout|kernels|processors|mask_kernels|adapter|pipeline|models|files|video|"
                             r"naming|sidecar|manifest|resume|prompts|plan|published|report|records|op)\._[a-z]\w*", text):
            bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, "\n".join(bad)


DOCS = [ROOT / "README.md", *ROOT.joinpath("docs").glob("*.md"), ROOT / "benchmarks" / "NOTES.md",
        ROOT / "weights" / "README.md", ROOT / "scripts" / "README.md", ROOT / "Dockerfile"]


def _texts():
    for path in DOCS + list(PKG.rglob("*.py")) + list(ROOT.joinpath("scripts").glob("*")):
        if path.is_file():
            yield path, path.read_text(encoding="utf-8")


def test_documents_cite_only_files_in_the_repository():
    """Guards: the repository stands alone: no pointers to files it does not contain."""
    forbidden = re.compile(r"\.\./shared|NABLA\.md|METHOD\.md|KINDS\.md|HOPPER\.md|\bissue [0-9]+\b")
    cited = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|scripts|wan_nabla|tests|weights|\.ci)/[\w./-]+\.(?:md|py|sh|jsonl|json|png|yaml|txt))(?![\w])")
    problems = []
    for path, text in _texts():
        for m in forbidden.finditer(text):
            problems.append(f"{path.relative_to(ROOT)}: mentions {m.group(0)!r}")
        for m in cited.finditer(text):
            target = m.group(1).rstrip(".")
            if not (ROOT / target).exists():
                problems.append(f"{path.relative_to(ROOT)}: cites missing {target}")
    assert not problems, "\n".join(problems)


def test_readme_layout_table_matches_the_tree():
    """Guards: the README's layout table names every module of the package, and only existing ones."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1]
    named = set(re.findall(r"`(wan_nabla/[\w/]+\.py|[\w/]+\.py)`", section))
    named = {n if n.startswith("wan_nabla/") else f"wan_nabla/{n}" for n in named}
    actual = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name not in ("__main__.py",)
              and not (p.name == "__init__.py" and p.parent != PKG and p.parent.name != "bench"
                       and p.parent.name != "presets")}
    assert named - actual == set(), f"README names missing modules: {sorted(named - actual)}"
    assert actual - named == set(), f"README layout table lacks: {sorted(actual - named)}"


@pytest.mark.slow
def test_wheel_ships_the_presets(tmp_path):
    """Guards: a non-editable install carries the presets (`--config nabla_0.7` works anywhere)."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("wan_nabla-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {Path(n).name for n in names if n.startswith("wan_nabla/presets/") and n.endswith(".yaml")}
    expected = {p.name for p in (PKG / "presets").glob("*.yaml")}
    assert presets == expected and "nabla_0.7.yaml" in presets
    assert "wan_nabla/magcache_ratios.json" in names  # `--cache mag` needs the published ratios


def test_attention_library_imports_nothing_from_the_app():
    """Guards the library boundary: no module under wan_nabla/attention imports a wan_nabla module
    outside wan_nabla/attention (function-level imports included)."""
    lib = PKG / "attention"
    bad = [f"{path.relative_to(ROOT)}: imports {target}" for path in lib.rglob("*.py")
           for target, _ in _imports(path)
           if target.startswith("wan_nabla") and not (target == "wan_nabla.attention"
                                                      or target.startswith("wan_nabla.attention."))]
    assert not bad, "\n".join(bad)
