"""The package's layer order: THIS FILE IS THE DOCUMENTED ARCHITECTURE of `pipeline/`.

The folders follow the data flow. A module may import only modules of its own folder or of a folder
with a LOWER rank (`RANKS` below); rank 0 is the base every layer may use:

    rank 0  pipeline/errors.py, pipeline/config.py, pipeline/files.py, pipeline/tracking*.py,
            pipeline/torchrun.py, pipeline/metrics/
    rank 1  pipeline/data/            raw and prepared data on disk
            pipeline/postprocessing/  probabilities into objects (instances)
    rank 2  pipeline/transforms/      weight maps, patches, augmentation presets
    rank 3  pipeline/preprocessing/   the prepare stage
    rank 4  pipeline/networks/        U-Net, UNet++, U2-Net
    rank 5  pipeline/inference/       sliding-window / streamed inference
    rank 6  pipeline/training/        the train stage
    rank 7  pipeline/evaluation/      the evaluate and report stages
    rank 9  pipeline/stages/          the entries of the DVC stages and of infer/export
            pipeline/commands/        the entries of the tools (dataset, manifest, weightmap)
            pipeline/cli.py, pipeline/__main__.py, pipeline/__init__.py

Only the entries (rank 9) read configs/: no module below them calls `load_config`, `read_config`,
`config_path`, `config_dir`, `cards_dir` or `preset_section` (a dataset's augmentation preset looked up
by name); they take settings as values. The benchmarks live beside
the package (`benchmarks/`): no module of pipeline/ imports them; `pipeline.cli.COMMANDS` names
`benchmarks.cli` as the lazy entry of `segpipe bench`.

Every module under pipeline/ is parsed with `ast` (nothing is imported): every `import` and
`from ... import` anywhere in the file (module level, inside functions, relative ones), plus string
constants that name a module of the package exactly (`importlib.import_module` tables, `python -m`).
The tests fail listing every import that goes to a higher rank, every import cycle between folders,
and every module (or imported module) whose folder has no rank: a new folder gets its rank here.

The import-graph helpers are shared with tests/test_dvc_deps.py.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"

# unit (a folder, or a module of the package root) -> rank. Keys are module names.
RANKS: dict[str, int] = {
    "pipeline.errors": 0,
    "pipeline.config": 0,
    "pipeline.tracking": 0,
    "pipeline.tracking_store": 0,
    "pipeline.tracking_datasets": 0,
    "pipeline.torchrun": 0,
    "pipeline.files": 0,
    "pipeline.metrics": 0,
    "pipeline.data": 1,
    "pipeline.postprocessing": 1,
    "pipeline.transforms": 2,
    "pipeline.preprocessing": 3,
    "pipeline.networks": 4,
    "pipeline.inference": 5,
    "pipeline.training": 6,
    "pipeline.evaluation": 7,
    "pipeline.stages": 9,
    "pipeline.cli": 9,
    "pipeline.commands": 9,
    "pipeline.__main__": 9,
    "pipeline": 9,  # pipeline/__init__.py
}


# --- the package's import graph (shared with test_dvc_deps.py) -------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement's target: `target` is the pipeline module (or package) it names."""

    target: str
    line: int
    kind: str = "import"  # "import" | "string" (a string constant naming a module)
    command: str | None = None  # a string of the `COMMANDS` table: the command whose entry it names


@dataclass
class Module:
    name: str
    path: Path  # absolute
    rel: str  # posix path relative to the repo root
    is_package: bool
    tree: ast.Module
    imports: list[Import] = field(default_factory=list)


@dataclass
class Package:
    root: Path
    modules: dict[str, Module]
    namespace_dirs: set[str]  # module names of folders without __init__.py

    def exists(self, name: str) -> bool:
        return name in self.modules or name in self.namespace_dirs

    def files_of(self, name: str) -> list[str]:
        """Files executed by importing `name`: its ancestors' __init__.py and its own file."""
        parts = name.split(".")
        out = []
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in self.modules:
                out.append(prefix)
        return out


def module_name(rel: Path) -> tuple[str, bool]:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _resolve_from(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute module name a `from X import ...` refers to (relative imports resolved)."""
    if not node.level:
        return node.module
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    if node.module:
        base = [*base, *node.module.split(".")]
    return ".".join(base)


def _is_ours(name: str | None) -> bool:
    return bool(name) and (name == PACKAGE or name.startswith(PACKAGE + "."))


COMMANDS_TABLE = "COMMANDS"  # in pipeline/cli.py: command -> (entry module, help)
LAZY_TABLE = "_API"  # in a package's __init__.py: public name -> the module it is loaded from on first use
LAZY = "(lazy)"


def _tables(tree: ast.Module) -> dict[str, ast.Dict]:
    out = {}
    for node in tree.body:
        target = (
            node.targets[0]
            if isinstance(node, ast.Assign) and len(node.targets) == 1
            else node.target
            if isinstance(node, ast.AnnAssign)
            else None
        )
        if isinstance(target, ast.Name) and isinstance(node.value, ast.Dict):
            out[target.id] = node.value
    return out


def command_strings(tree: ast.Module) -> dict[int, str]:
    """id(string node) -> command, for every string of a module-level `COMMANDS = {command: ...}` dict:
    the CLI imports the entry a value names only when that command runs. The strings of a lazy
    `_API` table get LAZY: a module loaded only when its name is used (never by the package itself)."""
    out: dict[int, str] = {}
    tables = _tables(tree)
    for key, value in (
        zip(tables[COMMANDS_TABLE].keys, tables[COMMANDS_TABLE].values) if COMMANDS_TABLE in tables else ()
    ):
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            out.update({id(n): key.value for n in ast.walk(value) if isinstance(n, ast.Constant)})
    if LAZY_TABLE in tables:
        out.update({id(n): LAZY for n in ast.walk(tables[LAZY_TABLE]) if isinstance(n, ast.Constant)})
    return out


def lazy_names(tree: ast.Module) -> set[str]:
    """The public names of a module's lazy `_API` table."""
    table = _tables(tree).get(LAZY_TABLE)
    return {k.value for k in table.keys if isinstance(k, ast.Constant)} if table is not None else set()


def parse_imports(module: Module, known: set[str]) -> list[Import]:
    """Every pipeline import of `module`, wherever it is in the file (a string of the `COMMANDS` table
    tagged with its command)."""
    out: list[Import] = []
    commands = command_strings(module.tree)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name):
                    out.append(Import(alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            if not _is_ours(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pipeline.x import y`: y is the submodule pipeline.x.y if there is one,
                # else a name of pipeline.x (which is imported either way).
                out.append(Import(sub if alias.name != "*" and sub in known else base, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value != module.name and node.value in known and _is_ours(node.value):
                out.append(Import(node.value, getattr(node, "lineno", 0), "string", commands.get(id(node))))
    return out


def load_package(root: Path = REPO_ROOT) -> Package:
    modules: dict[str, Module] = {}
    namespace_dirs: set[str] = set()
    pkg_dir = root / PACKAGE
    for path in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(root)
        name, is_package = module_name(rel)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
        modules[name] = Module(name, path, rel.as_posix(), is_package, tree)
    for d in [pkg_dir, *sorted(p for p in pkg_dir.rglob("*") if p.is_dir())]:
        if "__pycache__" in d.parts or not any(d.glob("*.py")):
            continue
        name = ".".join(d.relative_to(root).parts)
        if name not in modules:
            namespace_dirs.add(name)
    known = set(modules) | namespace_dirs
    for module in modules.values():
        module.imports = parse_imports(module, known)
    return Package(root, modules, namespace_dirs)


# --- layering --------------------------------------------------------------------------------------


def unit_of(name: str) -> str | None:
    """The RANKS key a module belongs to (its folder, or itself at the package root)."""
    parts = name.split(".")
    if len(parts) == 1:
        return name if name in RANKS else None
    key = ".".join(parts[:2])
    return key if key in RANKS else None


def _where(module: Module, imp: Import) -> str:
    what = "string reference" if imp.kind == "string" else "import"
    return f"{module.rel}:{imp.line} ({what})"


def _edges(pkg: Package):
    for module in pkg.modules.values():
        for imp in module.imports:
            yield module, imp


def test_every_module_has_a_rank() -> None:
    pkg = load_package()
    assert pkg.modules, "no module found under pipeline/"
    unranked = sorted({m.rel for m in pkg.modules.values() if unit_of(m.name) is None})
    unranked_targets = sorted(
        {f"{imp.target} (imported at {_where(m, imp)})" for m, imp in _edges(pkg) if unit_of(imp.target) is None}
    )
    assert not unranked and not unranked_targets, (
        "modules whose folder has no rank in tests/test_layers.py RANKS (give the folder a rank):\n  "
        + "\n  ".join(unranked + unranked_targets)
    )


def upward_imports(pkg: Package) -> list[str]:
    bad = []
    for module, imp in _edges(pkg):
        src, dst = unit_of(module.name), unit_of(imp.target)
        if src is None or dst is None:
            continue  # reported by test_every_module_has_a_rank
        if RANKS[dst] > RANKS[src]:
            bad.append(
                f"{module.name} ({src}, rank {RANKS[src]}) -> {imp.target} ({dst}, rank {RANKS[dst]})"
                f"   at {_where(module, imp)}"
            )
    return sorted(set(bad))


def test_no_import_goes_to_a_higher_rank() -> None:
    bad = upward_imports(load_package())
    assert not bad, (
        f"{len(bad)} import(s) go to a folder of higher rank (importer -> imported); move the code "
        "down, or pass values instead of importing upwards:\n  " + "\n  ".join(bad)
    )


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                components.append(sorted(component))
    return components


def folder_cycles(pkg: Package) -> list[str]:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], list[str]] = {}
    for module, imp in _edges(pkg):
        src, dst = unit_of(module.name), unit_of(imp.target)
        if src is None or dst is None or src == dst:
            continue
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
        where.setdefault((src, dst), []).append(f"{module.name} -> {imp.target} at {_where(module, imp)}")
    out = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        lines = [f"cycle between {', '.join(component)}:"]
        for (src, dst), sites in sorted(where.items()):
            if src in members and dst in members:
                lines += [f"    {site}" for site in sorted(set(sites))]
        out.append("\n".join(lines))
    return out


def test_no_import_cycles_between_folders() -> None:
    cycles = folder_cycles(load_package())
    assert not cycles, "import cycles between folders (importer -> imported):\n  " + "\n  ".join(cycles)


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """Self-test: a data module importing the networks folder, and a cycle, are reported."""
    pkg_dir = tmp_path / PACKAGE
    for folder in ("data", "networks"):
        (pkg_dir / folder).mkdir(parents=True)
    (pkg_dir / "__init__.py").write_text("")
    (pkg_dir / "errors.py").write_text("")
    (pkg_dir / "data" / "io.py").write_text(
        "from pipeline.errors import x\n\ndef f():\n    from ..networks import unet\n"
    )
    (pkg_dir / "networks" / "__init__.py").write_text("")
    (pkg_dir / "networks" / "unet.py").write_text("import pipeline.data.io\n")
    pkg = load_package(tmp_path)
    bad = upward_imports(pkg)
    assert bad == [
        "pipeline.data.io (pipeline.data, rank 1) -> pipeline.networks.unet (pipeline.networks, rank 4)"
        "   at pipeline/data/io.py:4 (import)"
    ], bad
    cycles = folder_cycles(pkg)
    assert len(cycles) == 1 and cycles[0].startswith("cycle between pipeline.data, pipeline.networks:"), cycles


# --- entries read configs/, benchmarks stay beside the package -------------------------------------

CONFIG_READERS = {"load_config", "read_config", "config_path", "config_dir", "cards_dir", "preset_section"}
"""Calls that read configs/ or look a section of it up by a dataset's name: entries only."""
ENTRY_UNITS = {"pipeline.stages", "pipeline.commands", "pipeline.cli", "pipeline.config"}
BENCHMARKS = "benchmarks"


def config_reads_below_entries(pkg: Package) -> list[str]:
    """Calls of a configs/ reader (`CONFIG_READERS`) in a module that is not an entry."""
    bad = []
    for module in pkg.modules.values():
        if unit_of(module.name) in ENTRY_UNITS:
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                if name in CONFIG_READERS:
                    bad.append(f"{module.rel}:{node.lineno}: {name}(...)")
    return sorted(bad)


def benchmark_imports(pkg: Package) -> list[str]:
    """Imports of the `benchmarks` package by a module of pipeline/ (a string of the CLI's COMMANDS
    table, the lazy entry of `segpipe bench`, is not an import)."""
    bad = []
    for module in pkg.modules.values():
        for node in ast.walk(module.tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            bad += [
                f"{module.rel}:{node.lineno}: imports {n}"
                for n in names
                if n == BENCHMARKS or n.startswith(BENCHMARKS + ".")
            ]
    return sorted(bad)


def test_only_the_entries_read_configs() -> None:
    bad = config_reads_below_entries(load_package())
    assert not bad, (
        "configs/ read below the entries (read it in the command's entry in pipeline/stages/ or "
        "pipeline/commands/ and pass the settings down):\n  " + "\n  ".join(bad)
    )


def test_the_package_never_imports_the_benchmarks() -> None:
    bad = benchmark_imports(load_package())
    assert not bad, "pipeline/ imports the benchmarks (they stay beside the product):\n  " + "\n  ".join(bad)


def facade_imports(pkg: Package) -> list[str]:
    """Imports, by a module of pipeline/, of a name a package loads lazily (its `_API`): the package's
    own code imports the module that defines it, so its deps show (the facade is for users)."""
    bad = []
    for module in pkg.modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve_from(module, node)
                if base in pkg.modules:
                    names = lazy_names(pkg.modules[base].tree) & {a.name for a in node.names}
                    bad += [f"{module.rel}:{node.lineno}: from {base} import {n}" for n in sorted(names)]
    return sorted(bad)


def test_the_package_imports_no_lazy_public_name() -> None:
    bad = facade_imports(load_package())
    assert not bad, (
        "import these from the module that defines them (the package's lazy public API is for "
        "users, and hides the module from tests/test_dvc_deps.py):\n  " + "\n  ".join(bad)
    )


def test_checker_catches_a_config_read_and_a_benchmark_import(tmp_path: Path) -> None:
    """Self-test: a training module reading configs/ and importing benchmarks is reported; an entry is not."""
    pkg_dir = tmp_path / PACKAGE
    for folder in ("training", "stages"):
        (pkg_dir / folder).mkdir(parents=True)
        (pkg_dir / folder / "__init__.py").write_text("")
    (pkg_dir / "__init__.py").write_text("")
    (pkg_dir / "training" / "loop.py").write_text(
        "from pipeline.config import load_config\n\ndef f():\n    import benchmarks.peak\n"
        "    return load_config('train')\n"
    )
    (pkg_dir / "stages" / "train.py").write_text(
        "from pipeline.config import read_config\nread_config('train', dict)\n"
    )
    pkg = load_package(tmp_path)
    assert config_reads_below_entries(pkg) == ["pipeline/training/loop.py:5: load_config(...)"]
    assert benchmark_imports(pkg) == ["pipeline/training/loop.py:4: imports benchmarks.peak"]
    (pkg_dir / "stages" / "__init__.py").write_text('_API = {"run": "pipeline.stages.train"}\n')
    (pkg_dir / "training" / "epochs.py").write_text("from pipeline.stages import run, other\n")
    assert facade_imports(load_package(tmp_path)) == ["pipeline/training/epochs.py:1: from pipeline.stages import run"]
