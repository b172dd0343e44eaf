"""The repository's structure: no import cycles, no private names across modules, documents that
cite only files that exist and links that resolve, a short README, a layout table (docs/design.md)
that matches the tree, the product package without the benchmark harness, and the presets shipped
from configs/ (their single source) unchanged.

The wheel is built once per module from a copy of the files a build reads (pyproject.toml,
setup.py, MANIFEST.in, README.md, configs/, wan_nabla/), so the checkout gets no build/ folder."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import ROOT

PKG = ROOT / "wan_nabla"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _from_target(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module a `from ... import` in `path` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    mod = _module_name(path).split(".")
    base = mod if path.name == "__init__.py" else mod[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported wan_nabla module, names taken from it) for every import in the file, function-level ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _from_target(node, path)
            if not target.startswith("wan_nabla"):
                continue
            names = [a.name for a in node.names]
            # `from . import x` imports the submodule x
            subs = [
                f"{target}.{n}"
                for n in names
                if (PKG.parent / f"{target}.{n}".replace(".", "/")).with_suffix(".py").exists()
                or (PKG.parent / f"{target}.{n}".replace(".", "/")).is_dir()
            ]
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
                cycle = stack[stack.index(dep) :] + [dep]
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
            bad += [
                f"{path.relative_to(ROOT)}: from {target} import {n}"
                for n in names
                if n.startswith("_") and not n.startswith("__")
            ]
        for m in re.finditer(
            r"\b(masks|layout|kernels|processors|mask_kernels|adapter|pipeline|models|files|video|"
            r"naming|sidecar|manifest|resume|prompts|plan|published|report|records|op)\._[a-z]\w*",
            text,
        ):
            bad.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not bad, "\n".join(bad)


DOCS = [
    ROOT / "README.md",
    *ROOT.joinpath("docs").glob("*.md"),
    ROOT / "benchmarks" / "NOTES.md",
    ROOT / "benchmarks" / "README.md",
    ROOT / "weights" / "README.md",
    ROOT / "scripts" / "README.md",
    ROOT / "Dockerfile",
]
HARNESS = ROOT / "benchmarks"


def _texts():
    code = [
        *PKG.rglob("*.py"),
        *HARNESS.joinpath("harness").rglob("*.py"),
        *HARNESS.joinpath("jobs").glob("*"),
        *ROOT.joinpath("scripts").glob("*"),
        *ROOT.joinpath("examples").glob("*"),
        *ROOT.joinpath("configs").glob("*"),
    ]
    for path in DOCS + code:
        if path.is_file():
            yield path, path.read_text(encoding="utf-8")


def test_documents_cite_only_files_in_the_repository():
    """Guards: the repository stands alone: no pointers to files it does not contain."""
    forbidden = re.compile(r"\.\./shared|NABLA\.md|METHOD\.md|KINDS\.md|HOPPER\.md|\bissue [0-9]+\b")
    cited = re.compile(
        r"(?<![\w/.-])((?:docs|benchmarks|scripts|wan_nabla|tests|weights|configs|examples|\.ci)/[\w./-]+\.(?:md|py|sh|jsonl|json|png|yaml|txt))(?![\w])"
    )
    problems = []
    for path, text in _texts():
        for m in forbidden.finditer(text):
            problems.append(f"{path.relative_to(ROOT)}: mentions {m.group(0)!r}")
        for m in cited.finditer(text):
            target = m.group(1).rstrip(".")
            if not (ROOT / target).exists():
                problems.append(f"{path.relative_to(ROOT)}: cites missing {target}")
    assert not problems, "\n".join(problems)


def test_layout_table_matches_the_tree():
    """Guards: the layout table (docs/design.md) names every module of the package, and only existing ones."""
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(wan_nabla/[\w/]+\.py|[\w/]+\.py)`", section))
    named = {n if n.startswith("wan_nabla/") else f"wan_nabla/{n}" for n in named}
    actual = {
        str(p.relative_to(ROOT))
        for p in PKG.rglob("*.py")
        if p.name not in ("__main__.py",)
        and not (p.name == "__init__.py" and p.parent != PKG and p.parent.name != "presets")
    }
    assert named - actual == set(), f"the layout table names missing modules: {sorted(named - actual)}"
    assert actual - named == set(), f"the layout table lacks: {sorted(actual - named)}"


README_MAX_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short_and_every_relative_link_resolves():
    """Guards: the README stays a front page (details live in docs/), and no README or docs link
    points at a file that is not in the repository (anchors and web addresses are not checked)."""
    readme = ROOT / "README.md"
    lines = readme.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; keep it <= {README_MAX_LINES}, move detail to docs/"
    )
    broken = []
    pages = [readme, *sorted(ROOT.joinpath("docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ has no pages"
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    """Guards: a docs page nobody links to is a page nobody finds."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.split("#", 1)[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    pages = {p.name for p in ROOT.joinpath("docs").glob("*.md")}
    assert pages - linked == set(), f"README.md does not link: {sorted(pages - linked)}"


# ---- the product package holds the product ---------------------------------------------------------
def test_the_package_never_imports_the_benchmarks():
    """Guards: the harness may import the product, never the other way round (no `import benchmarks`,
    no `from benchmarks...`, no importlib string naming it): `pip install .` must work without it."""
    bad = []
    for path in PKG.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bad += [f"{path.relative_to(ROOT)}: imports {n}" for n in names if n.split(".")[0] == "benchmarks"]
        if re.search(r"import_module\(\s*[\"']benchmarks", text):
            bad.append(f"{path.relative_to(ROOT)}: import_module('benchmarks...')")
    assert not bad, "\n".join(bad)
    assert not (PKG / "bench").exists() and not (PKG / "compare" / "table.py").exists()


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> dict[str, bytes]:
    """{path in the wheel: bytes} of a wheel built from a copy of the build's inputs (plus a stale
    build/lib holding an old harness module)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("configs", "wan_nabla"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    # a stale build folder from before the harness moved out must not leak it back into a wheel
    stale = src / "build" / "lib" / "wan_nabla" / "bench"
    stale.mkdir(parents=True)
    (stale / "targets.py").write_text("TARGETS = {}\n")
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with zipfile.ZipFile(next(out.glob("wan_nabla-*.whl"))) as z:
        return {n: z.read(n) for n in z.namelist() if not n.endswith("/")}


def test_wheel_holds_the_package_and_no_benchmark_code(wheel_files):
    """Guards: the wheel is exactly the package's modules plus the presets: every wan_nabla module is
    in it (a new subpackage is not dropped), nothing of benchmarks/ or tests/, no harness module."""
    code = {n for n in wheel_files if n.endswith(".py")}
    expected = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")}
    assert code == expected, (sorted(code - expected), sorted(expected - code))
    tops = {n.split("/", 1)[0] for n in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"wan_nabla"}, tops
    lab = {p.read_bytes() for p in [*HARNESS.rglob("*.py"), *HARNESS.rglob("*.sh")] if p.stat().st_size > 200}
    leaked = [n for n, b in wheel_files.items() if "/bench/" in n or b in lab]
    assert not leaked, f"benchmark code in the wheel: {leaked}"
    assert "wan_nabla/magcache_ratios.json" in wheel_files  # `--cache mag` needs the published ratios


def test_configs_are_the_shipped_presets_byte_for_byte(wheel_files):
    """Guards: configs/ is the presets' single source: the wheel ships exactly its files, byte for
    byte under the same names; the checkout keeps no second copy in the package; and a checkout
    (editable install, PYTHONPATH) resolves preset names to configs/."""
    from wan_nabla import presets

    configs = {p.name: p.read_bytes() for p in sorted((ROOT / "configs").glob("*"))}
    assert configs and all(n.endswith(".yaml") for n in configs), sorted(configs)
    shipped = {
        Path(n).name: b for n, b in wheel_files.items() if n.startswith("wan_nabla/presets/") and not n.endswith(".py")
    }
    assert shipped == configs
    assert not list((PKG / "presets").glob("*.y*ml")), (
        "a YAML inside wan_nabla/presets/ is a second copy: edit configs/"
    )
    assert presets.PRESET_DIR == ROOT / "configs"
    assert presets.preset_path("nabla_0.7") == ROOT / "configs" / "nabla_0.7.yaml"
    assert presets.preset_names() == sorted(Path(n).stem for n in configs)


def test_docker_image_builds_the_presets_in_and_leaves_the_lab_out():
    """Guards: the image's `pip install .` has what the build needs to ship the presets (configs/,
    setup.py, MANIFEST.in, allowed by .dockerignore too) and copies no benchmark or lab files."""
    copies = [line.split()[1:-1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    sources = {s.rstrip("/") for srcs in copies for s in srcs}
    assert {"configs", "setup.py", "MANIFEST.in", "pyproject.toml", "wan_nabla"} <= sources, sources
    assert not sources & {"benchmarks", "scripts", "tests", "."}, sources
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    assert {"configs", "setup.py", "MANIFEST.in"} <= allowed and "benchmarks" not in allowed, allowed


def test_attention_library_imports_nothing_from_the_app():
    """Guards the library boundary: no module under wan_nabla/attention imports a wan_nabla module
    outside wan_nabla/attention (function-level imports included)."""
    lib = PKG / "attention"
    bad = [
        f"{path.relative_to(ROOT)}: imports {target}"
        for path in lib.rglob("*.py")
        for target, _ in _imports(path)
        if target.startswith("wan_nabla")
        and not (target == "wan_nabla.attention" or target.startswith("wan_nabla.attention."))
    ]
    assert not bad, "\n".join(bad)


TESTS = ROOT / "tests"


def test_tests_mirror_the_packages_and_helpers_live_in_support():
    """Guards the test layout: a test file sits at tests/ (top-level modules and repository rules)
    or in a folder named after a subpackage of wan_nabla/ (tests/batch/ for wan_nabla/batch/) or
    tests/benchmarks/; every test folder is a package (so equal file names in two folders do not
    clash); helpers (modules that are not test_*.py) live only in tests/support/, which holds no
    tests; and no test imports another test module (shared code goes to tests/support/)."""
    subpackages = {p.parent.relative_to(PKG).parts[0] for p in PKG.glob("*/**/*.py")}
    allowed = subpackages | {"benchmarks", "support"}
    problems = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS)
        if "__pycache__" in rel.parts:
            continue
        folder = rel.parts[0] if len(rel.parts) > 1 else None
        if len(rel.parts) > 2 or (folder is not None and folder not in allowed):
            problems.append(f"tests/{rel}: not in tests/ or a folder named after a package ({sorted(allowed)})")
        if folder == "support" and rel.name.startswith("test_"):
            problems.append(f"tests/{rel}: tests/support/ holds helpers, not tests")
        if folder != "support" and not rel.name.startswith("test_") and rel.name not in ("__init__.py", "conftest.py"):
            problems.append(f"tests/{rel}: a helper outside tests/support/")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                targets = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            if any(t.rpartition(".")[2].startswith("test_") for t in targets):
                problems.append(f"tests/{rel}: imports a test module ({', '.join(targets)})")
    for folder in {p.parent for p in TESTS.rglob("*.py")} - {TESTS}:
        if "__pycache__" not in folder.parts and not (folder / "__init__.py").exists():
            problems.append(f"{folder.relative_to(ROOT)}: no __init__.py")
    assert not problems, "\n".join(problems)
    assert {p.parent.name for p in TESTS.glob("*/test_*.py")} >= {
        "attention",
        "batch",
        "compare",
        "distributed",
        "output",
        "serve",
        "wan",
    }


OPTIONAL_IMPORTS = (
    # optional dependencies: extras or GPU-only packages the base install runs without
    "flash_attn",
    "cutlass",
    "torchao",
    "ray",
    "uvicorn",
    "fastapi",
    "starlette",
    "matplotlib",
    "skimage",
    "triton",
    # modules of the package that import one of those at their top
    "wan_nabla.attention.backends.fa4_mask",
    "wan_nabla.compare.pictures",
    "wan_nabla.serve.app",
)
HANDOVER = {
    # the CLI's one hand-over from the light layers to a command's runner, once preflight accepted the input
    "wan_nabla/cli.py": ("wan_nabla.app", "wan_nabla.batch.run", "wan_nabla.compare.run", "wan_nabla.serve.main"),
}


def _absolute_targets(node: ast.Import | ast.ImportFrom, path: Path) -> list[str]:
    """The modules an import statement reads: `from . import a, b` reads the submodules a and b."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    target = _from_target(node, path)
    return [target] if node.module or not node.level else [f"{target}.{a.name}" for a in node.names]


def test_imports_sit_at_the_top_of_modules():
    """Guards issue 20 point 5: imports sit at the top of modules, and the light layers (CLI, config,
    preflight) stay light by what they import, not by hiding imports in functions. An import inside
    a function is allowed only for an optional dependency (or a module of the package that needs
    one), for the CLI's hand-over to a command's runner, and in a module-level __getattr__ (PEP
    562: `import wan_nabla` stays light while its heavy names still resolve)."""
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        lazy_ok = {n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"}
        rel = str(path.relative_to(ROOT))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn in lazy_ok:
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                for target in _absolute_targets(node, path):
                    root = target.split(".")[0]
                    if root in OPTIONAL_IMPORTS or target in OPTIONAL_IMPORTS or target in HANDOVER.get(rel, ()):
                        continue
                    bad.append(f"{rel}:{node.lineno} imports {target} inside {fn.name}()")
    assert not bad, "move these to the top of their module (or split the module):\n" + "\n".join(bad)


def test_nothing_replaces_the_attention_runs_methods():
    """Guards issue 20 point 4: tools observe an attention run through `run.stats.subscribe(...)`
    and never replace its methods at run time. No module of the package, the benchmarks or the
    tests assigns, or `setattr`s, a method of AttentionRun, Statistics or ForwardState (properties
    with setters, such as `run.layout`, are the classes' own API and allowed)."""
    run_py = ast.parse((PKG / "attention" / "run.py").read_text())
    methods = set()
    for cls in run_py.body:
        if isinstance(cls, ast.ClassDef) and cls.name in ("AttentionRun", "Statistics", "ForwardState"):
            for fn in cls.body:
                is_property = isinstance(fn, ast.FunctionDef) and any(
                    (isinstance(d, ast.Name) and d.id == "property") or isinstance(d, ast.Attribute)
                    for d in fn.decorator_list
                )
                if isinstance(fn, ast.FunctionDef) and not is_property and not fn.name.startswith("__"):
                    methods.add(fn.name)
    assert {"attend", "plan", "record", "emit", "subscribe"} <= methods, methods
    owners = re.compile(r"(^|\.|\b)(run|stats|AttentionRun|Statistics|ForwardState|run\(\))$")
    bad = []
    for path in sorted([*PKG.rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py"), *TESTS.rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[tuple[ast.expr, str]] = []
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if isinstance(t, ast.Attribute):
                        targets.append((t.value, t.attr))
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and len(node.args) >= 2:
                name = node.args[1]
                if isinstance(name, ast.Constant) and isinstance(name.value, str):
                    targets.append((node.args[0], name.value))
            for owner, attr in targets:
                if attr in methods and owners.search(ast.unparse(owner)):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} replaces {ast.unparse(owner)}.{attr}")
    assert not bad, "subscribe an Observer (attention/run.py) instead:\n" + "\n".join(bad)


def test_one_environment_record():
    """Guards issue 20 point 7 ("one environment record"): versions and the commit are read in one
    place, wan_nabla/output/environment.py, which benchmarks/harness/records.py extends with the
    command line; no other module or job script reads them itself."""
    allowed = {
        PKG / "output" / "environment.py",
        PKG / "output" / "sidecar.py",
        ROOT / "benchmarks" / "harness" / "records.py",
    }
    # a hand-built record: a commit looked up, or a library's version stored under a key
    pattern = re.compile(r"\bgit_commit\(|[\"']\s*:\s*(torch|diffusers|transformers|triton|ray)\.__version__")
    bad = []
    for path in sorted(
        [
            *PKG.rglob("*.py"),
            *ROOT.joinpath("benchmarks").rglob("*.py"),
            *ROOT.joinpath("benchmarks", "jobs").glob("*.sh"),
        ]
    ):
        if path in allowed:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "use the environment record (output/environment.py, benchmarks.harness.records):\n" + "\n".join(bad)


def test_each_attention_backend_states_its_limits_first():
    """Guards issue 20 point 3: every module of attention/backends/ says what it cannot do within the
    first lines of its docstring (a reader choosing a backend reads no further)."""
    missing = []
    for path in sorted((PKG / "attention" / "backends").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        head = "\n".join(doc.splitlines()[:6])
        if path.name != "__init__.py" and "Limits" not in head:
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"no 'Limits:' in the first lines of: {missing}"
