"""DVC deps complete by construction: every stage of dvc.yaml depends on exactly the code and the
params it uses, derived from the code at test time (nothing imported, nothing run, no `dvc repro`).

dvc.yaml is expanded with DVC's own resolver (its `vars`, `foreach` and `matrix`), then for every
stage:

  code    `cmd` is `segpipe SUB ...`: the console script runs pipeline/__init__.py and
          pipeline/cli.py, which imports only SUB's entry module, the one its `COMMANDS` table names
          for SUB. The transitive closure over every pipeline import (module level or in a function,
          relative, `from pipeline.x import y` = pipeline.x.y when y is a module, a package pulls its
          __init__, a string naming a module as in importlib tables; see tests/test_layers.py) is the
          stage's code; the strings of `COMMANDS` count only for their own command.
    (a)   every code file is covered by a dep (the file, or a folder holding it);
    (b)   every dep under pipeline/ is used: a file dep is a code file, a folder dep holds only code
          files of the stage (no over-broad folder), and folder deps only if .dvcignore ignores
          __pycache__ (else their hash includes .pyc files that git does not track);
  params
    (c)   every `load_config("NAME")` of the closure has configs/NAME.yaml among the stage's params
          files, and every params file of the stage is read by the closure;
  paths   every dep exists or is an output of a stage (catches typos such as pipeline.x.y.py);
  report
    (d)   the `segpipe report` stage's deps cover results/<dataset>/<network>/metrics.json (and
          models/<dataset>/<network>/log.csv, which report.py reads for the training facts) of every
          dataset of configs/data.yaml x network of configs/train.yaml (the file, or a folder holding
          it), some stage outputs each, and no such file outside the matrix is named.

Failures name the stage and the missing/extra dep, and print the code deps the stage should have:
paste them into dvc.yaml.
"""

from __future__ import annotations

import ast
import copy
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from test_layers import COMMANDS_TABLE, PACKAGE, REPO_ROOT, Module, Package, command_strings, load_package

CLI_MODULE = f"{PACKAGE}.cli"
CONFIG_FUNCTIONS = ("load_config", "read_config")
CONFIG_MODULE = f"{PACKAGE}.config"


# --- dvc.yaml --------------------------------------------------------------------------------------


def resolved_stages(root: Path = REPO_ROOT) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages as DVC expands them (`foreach`/`matrix` with `vars`): name -> stage dict."""
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    with Repo(str(root), uninitialized=True) as repo:
        dvcfile = load_file(repo, os.path.join(str(root), "dvc.yaml"))
        return dvcfile.resolver.resolve()["stages"]


def _norm(path: str, wdir: str | None = None) -> str:
    return Path(os.path.normpath(os.path.join(wdir or ".", path))).as_posix()


def stage_deps(stage: dict[str, Any]) -> list[str]:
    return [_norm(d, stage.get("wdir")) for d in stage.get("deps") or [] if isinstance(d, str)]


def stage_params_files(stage: dict[str, Any]) -> set[str]:
    """The params files of a stage: keys of dict entries (`configs/x.yaml: [keys]` or `configs/x.yaml:`);
    a plain string entry is a key of DVC's default params.yaml."""
    files = set()
    for entry in stage.get("params") or []:
        if isinstance(entry, dict):
            files.update(_norm(k, stage.get("wdir")) for k in entry)
        else:
            files.add(_norm("params.yaml", stage.get("wdir")))
    return files


def _out_paths(stage: dict[str, Any]) -> list[str]:
    out = []
    for key in ("outs", "metrics", "plots"):
        for entry in stage.get(key) or []:
            for path in entry if isinstance(entry, dict) else [entry]:
                out.append(_norm(path, stage.get("wdir")))
    return out


def all_outputs(stages: dict[str, dict[str, Any]]) -> set[str]:
    return {path for stage in stages.values() for path in _out_paths(stage)}


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


# --- the code a stage runs -------------------------------------------------------------------------


@dataclass
class StageCode:
    subcommand: str
    entry: str | None  # the entry module COMMANDS names for the subcommand
    modules: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)  # repo-relative posix paths
    configs: dict[str, list[str]] = field(default_factory=dict)  # NAME -> where load_config("NAME") is
    problems: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # file -> the import that brings it in


def _config_calls(module: Module) -> list[tuple[str | None, int]]:
    """`load_config(...)` / `read_config(...)` calls of a module: (config name or None when unresolvable,
    line)."""
    if module.name == CONFIG_MODULE:
        return []  # where the readers are defined
    aliases = set(CONFIG_FUNCTIONS)
    constants: dict[str, str] = {}
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            constants.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            constants[node.target.id] = node.value.value
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom) and node.module == CONFIG_MODULE:
            aliases.update(a.asname for a in node.names if a.name in CONFIG_FUNCTIONS and a.asname)
    out: list[tuple[str | None, int]] = []
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if fname not in aliases:
            continue
        arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            name = arg.value
        elif isinstance(arg, ast.Name) and arg.id in constants:
            name = constants[arg.id]
        else:
            name = None
        out.append((name, node.lineno))
    return out


def find_entry(pkg: Package, argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """The entry module cli.py's `COMMANDS` table names for `segpipe SUB ...`, and the whole table
    (command -> entry module)."""
    cli = pkg.modules[CLI_MODULE]
    table = {}
    for node_id, command in command_strings(cli.tree).items():
        for node in ast.walk(cli.tree):
            if id(node) == node_id and isinstance(node.value, str) and pkg.exists(node.value):
                table[command] = node.value
    return table.get(argv[1]), table


def stage_code(pkg: Package, cmd: str) -> StageCode:
    """The code files and config files of one `segpipe` command.

    The console script imports pipeline/__init__.py and pipeline/cli.py and runs main(), which imports
    the entry module of the subcommand (cli.py's `COMMANDS`). From there every pipeline import counts,
    wherever it is; a string of the table counts only for its own command.
    """
    try:
        argv = shlex.split(cmd)
    except ValueError as exc:
        return StageCode("?", None, problems=[f"cmd {cmd!r} cannot be parsed: {exc}"])
    if len(argv) < 2 or os.path.basename(argv[0]) != "segpipe":
        return StageCode("?", None, problems=[f"cmd {cmd!r} is not a `segpipe SUBCOMMAND ...` call"])
    entry, table = find_entry(pkg, argv)
    code = StageCode(argv[1], entry)
    if entry is None:
        code.problems.append(
            f"cmd {cmd!r}: {PACKAGE}/cli.py {COMMANDS_TABLE} names no entry module of {PACKAGE}/ "
            f"for {argv[1]!r} (commands: {', '.join(sorted(table))})"
        )
        return code

    todo: list[tuple[str, str]] = [(CLI_MODULE, "the segpipe console script")]
    while todo:
        target, where = todo.pop()
        if not pkg.exists(target):
            code.problems.append(f"{where}: imports {target}, which is no module of {PACKAGE}/ (moved?)")
            continue
        for name in pkg.files_of(target):
            if name in code.modules:
                continue
            code.modules.add(name)
            module = pkg.modules[name]
            code.why.setdefault(module.rel, where)
            todo.extend(
                (imp.target, f"{module.rel}:{imp.line}")
                for imp in module.imports
                if imp.command in (None, code.subcommand)
            )
    code.files = {pkg.modules[m].rel for m in code.modules}
    for name in sorted(code.modules):
        module = pkg.modules[name]
        for config, line in _config_calls(module):
            if config is None:
                code.problems.append(
                    f"{module.rel}:{line}: {'/'.join(CONFIG_FUNCTIONS)}(...) with an argument that is "
                    "not a string literal or a module-level string constant: "
                    "the test cannot tell the file"
                )
            else:
                code.configs.setdefault(config, []).append(f"{module.rel}:{line}")
    return code


PYCACHE_PATTERNS = {
    "__pycache__",
    "__pycache__/",
    "/**/__pycache__",
    "**/__pycache__",
    "**/__pycache__/",
    "*.pyc",
    "**/*.pyc",
}


def pycache_ignored(root: Path = REPO_ROOT) -> bool:
    """Whether .dvcignore keeps __pycache__/*.pyc (untracked by git) out of folder deps' hashes."""
    path = root / ".dvcignore"
    if not path.is_file():
        return False
    lines = {line.split("#", 1)[0].strip() for line in path.read_text().splitlines()}
    return bool(lines & PYCACHE_PATTERNS)


def compact_deps(files: set[str], root: Path = REPO_ROOT) -> list[str]:
    """The shortest exact dep list for `files`: a folder when every .py file under it is used (and
    .dvcignore ignores __pycache__, else the files)."""
    if not pycache_ignored(root):
        return sorted(files)
    chosen: list[str] = []
    folders = sorted({str(PurePosixPath(f).parent) for f in files}, key=lambda p: (p.count("/"), p))
    candidates = set()
    for folder in folders:  # every ancestor folder inside the package too
        parts = PurePosixPath(folder).parts
        for i in range(2, len(parts) + 1):
            candidates.add("/".join(parts[:i]))
    for folder in sorted(candidates, key=lambda p: (p.count("/"), p)):
        if any(covers(c, folder) for c in chosen):
            continue
        py = {p.relative_to(root).as_posix() for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts}
        if py and py <= files:
            chosen.append(folder)
    rest = [f for f in files if not any(covers(c, f) for c in chosen)]
    return sorted(chosen + rest)


def _py_files_under(folder: str, root: Path) -> set[str]:
    base = root / folder
    if base.is_file():
        return {folder}
    return {p.relative_to(root).as_posix() for p in base.rglob("*.py") if "__pycache__" not in p.parts}


# --- the checks ------------------------------------------------------------------------------------


def check_stage(
    name: str, stage: dict[str, Any], pkg: Package, *, root: Path = REPO_ROOT, outputs: set[str] | None = None
) -> list[str]:
    """Problems of one resolved stage (a)-(c) and its paths; each message names the stage."""
    problems: list[str] = []
    cmds = stage.get("cmd")
    cmds = cmds if isinstance(cmds, list) else [cmds or ""]
    codes = [stage_code(pkg, c) for c in cmds]
    deps = stage_deps(stage)
    files = set().union(*(c.files for c in codes))
    why = {f: w for c in codes for f, w in c.why.items()}
    configs: dict[str, list[str]] = {}
    for c in codes:
        problems += [f"stage {name}: {p}" for p in c.problems]
        for config, where in c.configs.items():
            configs.setdefault(config, []).extend(where)
    if not any(c.entry for c in codes):
        return problems
    # (a) every code file covered
    for f in sorted(files):
        if not any(covers(d, f) for d in deps):
            problems.append(f"stage {name}: missing dep {f} (code the stage runs, imported at {why.get(f, '?')})")
    # (b) every pipeline/ dep used, folders not over-broad
    for d in deps:
        if not covers(PACKAGE, d):
            continue
        used = {f for f in files if covers(d, f)}
        if not used:
            problems.append(f"stage {name}: extra dep {d} (the stage runs none of its code)")
            continue
        unused = sorted(_py_files_under(d, root) - files)
        if unused:
            problems.append(f"stage {name}: over-broad dep {d} (the stage does not run {', '.join(unused)})")
        elif (root / d).is_dir() and not pycache_ignored(root):
            problems.append(
                f"stage {name}: folder dep {d} also hashes its __pycache__/*.pyc, which git does not "
                "track (a fresh clone would rerun the stage): list its files, or add `__pycache__/` "
                "to .dvcignore"
            )
    # (c) params files == configs the code reads
    params = stage_params_files(stage)
    wanted = {f"configs/{c}.yaml": where for c, where in configs.items()}
    for f, where in sorted(wanted.items()):
        if f not in params:
            problems.append(
                f"stage {name}: missing params file {f} (load_config at {', '.join(sorted(set(where)))};"
                f" add `- {f}:` with the keys read, or none for the whole file)"
            )
    for f in sorted(params - set(wanted)):
        problems.append(
            f"stage {name}: extra params file {f} "
            f"(no load_config/read_config({PurePosixPath(f).stem!r}) in the stage's code)"
        )
    # every dep exists or is produced by a stage
    if outputs is not None:
        for d in deps:
            if not (root / d).exists() and not any(covers(o, d) or covers(d, o) for o in outputs):
                problems.append(f"stage {name}: dep {d} does not exist and no stage outputs it")
    return problems


def suggested_code_deps(stage: dict[str, Any], pkg: Package, root: Path = REPO_ROOT) -> list[str]:
    cmds = stage.get("cmd")
    cmds = cmds if isinstance(cmds, list) else [cmds or ""]
    return compact_deps(set().union(*(stage_code(pkg, c).files for c in cmds)), root)


def suggested_params_files(stage: dict[str, Any], pkg: Package) -> list[str]:
    cmds = stage.get("cmd")
    cmds = cmds if isinstance(cmds, list) else [cmds or ""]
    return sorted({f"configs/{name}.yaml" for c in cmds for name in stage_code(pkg, c).configs})


def report_matrix_deps(root: Path = REPO_ROOT) -> list[str]:
    """What `segpipe report` reads for the matrix configs/data.yaml datasets x configs/train.yaml networks."""
    data = yaml.safe_load((root / "configs" / "data.yaml").read_text())
    train = yaml.safe_load((root / "configs" / "train.yaml").read_text())
    evaluate = yaml.safe_load((root / "configs" / "evaluate.yaml").read_text())
    results, models = evaluate.get("results_dir", "results"), train.get("models_dir", "models")
    deps = [f"{results}/{d}/{n}/metrics.json" for d in data["datasets"] for n in train["networks"]]
    deps += [f"{models}/{d}/{n}/log.csv" for d in data["datasets"] for n in train["networks"]]
    return [_norm(d) for d in deps]


def _subcommands(stage: dict[str, Any]) -> list[str]:
    cmds = stage.get("cmd")
    out = []
    for cmd in cmds if isinstance(cmds, list) else [cmds or ""]:
        try:
            argv = shlex.split(cmd)
        except ValueError:
            continue
        if len(argv) >= 2 and os.path.basename(argv[0]) == "segpipe":
            out.append(argv[1])
    return out


def check_report(stages: dict[str, dict[str, Any]], root: Path = REPO_ROOT) -> list[str]:
    """(d): the report stage's deps cover every metrics.json / log.csv of the matrix (a dep is the
    file or a folder holding it), name no such file outside the matrix, and some stage makes each."""
    expected = report_matrix_deps(root)
    outputs = all_outputs(stages)
    reports = {n: s for n, s in stages.items() if "report" in _subcommands(s)}
    if not reports:
        return ["no stage runs `segpipe report`"]
    problems = []
    globs = {str(PurePosixPath(*PurePosixPath(p).parts[:-3], "*", "*", PurePosixPath(p).name)) for p in expected}
    for name, stage in reports.items():
        deps = stage_deps(stage)
        for p in expected:
            if not any(covers(d, p) for d in deps):
                problems.append(
                    f"stage {name}: missing dep {p} (dataset x network of configs/data.yaml x configs/train.yaml)"
                )
            if not any(covers(o, p) for o in outputs):
                problems.append(f"stage {name}: {p} is in the matrix but no stage outputs it")
        for d in deps:
            if d not in expected and any(PurePosixPath(d).match(g) for g in globs):
                problems.append(f"stage {name}: extra dep {d} (not in the dataset x network matrix)")
    return problems


def _report(problems: list[str], stages: dict[str, dict[str, Any]], pkg: Package, *, with_code: bool) -> str:
    """Problems grouped by stage template (train@a-b, train@c-d ... -> train), then the deps to use."""
    by_group: dict[str, dict[str, list[str]]] = {}
    for p in problems:
        head, _, text = p.partition(": ")
        stage = head.removeprefix("stage ")
        if not head.startswith("stage ") or stage not in stages:
            stage, text = "(dvc.yaml)", p
        group = stage.split("@", 1)[0]
        by_group.setdefault(group, {}).setdefault(text, []).append(stage)
    lines = []
    for group, texts in by_group.items():
        members = sorted(n for n in stages if n.split("@", 1)[0] == group)
        lines.append(
            f"stage {group}:"
            if members in ([], [group])
            else f"stage {group} ({len(members)} stages: {', '.join(members)}):"
        )
        for text, names in texts.items():
            instances = sorted(set(names))
            scope = "" if instances == members or instances == [group] else f"   [only {', '.join(instances)}]"
            lines.append(f"  {text}{scope}")
        if with_code:
            example = next((s for n, s in stages.items() if n.split("@", 1)[0] == group), None)
            if example is not None:
                lines.append(f"  => the {PACKAGE}/ deps of `{group}` in dvc.yaml should be exactly:")
                lines += [f"      - {d}" for d in suggested_code_deps(example, pkg)]
                lines.append(
                    f"  => its params files should be exactly (keys as read): "
                    f"{', '.join(suggested_params_files(example, pkg)) or 'none'}"
                )
    return "\n".join(lines)


# --- tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pkg() -> Package:
    return load_package()


@pytest.fixture(scope="module")
def stages() -> dict[str, dict[str, Any]]:
    out = resolved_stages()
    assert out, "dvc.yaml has no stages"
    return out


def test_stage_code_deps_and_params_are_exact(stages: dict[str, dict[str, Any]], pkg: Package) -> None:
    outputs = all_outputs(stages)
    problems = [p for name, stage in stages.items() for p in check_stage(name, stage, pkg, outputs=outputs)]
    assert not problems, "dvc.yaml deps/params do not match the code the stages run:\n" + _report(
        problems, stages, pkg, with_code=True
    )


def test_report_follows_the_matrix(stages: dict[str, dict[str, Any]], pkg: Package) -> None:
    problems = check_report(stages)
    expected = report_matrix_deps()
    folders = sorted({PurePosixPath(p).parts[0] for p in expected})
    assert not problems, (
        "the report stage does not follow the dataset x network matrix:\n"
        + _report(problems, stages, pkg, with_code=False)
        + f"\n  => its data deps should cover (dvc.yaml uses the folders {', '.join(folders)}, which hold every "
        "combination; see the comment there):\n" + "\n".join(f"      - {d}" for d in expected)
    )


def test_checker_catches_a_missing_or_extra_dep(stages: dict[str, dict[str, Any]], pkg: Package) -> None:
    """Self-test: a stage built from the checker's own suggestion passes; removing one code dep, adding an
    unused folder, dropping a params file or a matrix dep is each reported, naming stage and dep."""
    name, stage = next((n, s) for n, s in stages.items() if str(s.get("cmd", "")).startswith("segpipe "))
    code = stage_code(pkg, stage["cmd"])
    assert code.entry and not code.problems, code.problems
    good = {
        "cmd": stage["cmd"],
        "deps": suggested_code_deps(stage, pkg),
        "params": [{f"configs/{c}.yaml": None} for c in sorted(code.configs)],
    }
    assert check_stage(name, good, pkg) == []

    removed = good["deps"][-1]
    bad = copy.deepcopy(good)
    bad["deps"].remove(removed)
    problems = check_stage(name, bad, pkg)
    assert problems and all(p.startswith(f"stage {name}: missing dep ") for p in problems), problems
    assert any(removed in p for p in problems), problems

    folders = sorted({str(PurePosixPath(m.rel).parent) for m in pkg.modules.values()} - {PACKAGE})
    unused = next((d for d in folders if not any(covers(d, f) for f in code.files)), None)
    if unused is not None:
        bad = copy.deepcopy(good)
        bad["deps"].append(unused)
        assert check_stage(name, bad, pkg) == [f"stage {name}: extra dep {unused} (the stage runs none of its code)"]
    partly = next(
        (
            d
            for d in folders
            if any(covers(d, f) for f in code.files) and not _py_files_under(d, REPO_ROOT) <= code.files
        ),
        None,
    )
    if partly is not None:
        bad = copy.deepcopy(good)
        bad["deps"].append(partly)
        assert any(p.startswith(f"stage {name}: over-broad dep {partly} ") for p in check_stage(name, bad, pkg))

    if code.configs:
        bad = copy.deepcopy(good)
        dropped = bad["params"].pop()
        assert any(
            p.startswith(f"stage {name}: missing params file {next(iter(dropped))}")
            for p in check_stage(name, bad, pkg)
        )

    matrix = report_matrix_deps()
    others = {n: s for n, s in stages.items() if "report" not in _subcommands(s)}
    report = {"cmd": "segpipe report", "deps": matrix[1:]}
    assert check_report({**others, "report": report}) == [
        f"stage report: missing dep {matrix[0]} (dataset x network of configs/data.yaml x configs/train.yaml)"
    ]
    stale = str(PurePosixPath(matrix[0]).parent.parent / "no-such-network" / PurePosixPath(matrix[0]).name)
    report = {"cmd": "segpipe report", "deps": [*matrix, stale]}
    assert check_report({**others, "report": report}) == [
        f"stage report: extra dep {stale} (not in the dataset x network matrix)"
    ]
    folders = sorted({PurePosixPath(p).parts[0] for p in matrix})  # results, models: hold every combination
    assert check_report({**others, "report": {"cmd": "segpipe report", "deps": folders}}) == []


# what a stage must not run: the code of other stages and of the user's inference runs
NOT_IN = {
    "train": (
        "pipeline/inference/writers/",
        "pipeline/inference/run/",
        "pipeline/inference/backends/onnx_",
        "pipeline/inference/backends/select.py",
        "pipeline/stages/evaluate.py",
        "pipeline/stages/infer.py",
        "pipeline/commands/",
        "benchmarks/",
    ),
    "evaluate": (
        "pipeline/inference/writers/",
        "pipeline/inference/run/",
        "pipeline/inference/backends/onnx_",
        "pipeline/inference/backends/select.py",
        "pipeline/stages/train.py",
        "pipeline/training/",
        "pipeline/commands/",
        "benchmarks/",
    ),
    "prepare": ("pipeline/inference/", "pipeline/networks/", "pipeline/training/", "pipeline/stages/train.py"),
    "download": (
        "pipeline/preprocessing/",
        "pipeline/transforms/",
        "pipeline/inference/",
        "pipeline/stages/prepare.py",
    ),
}


@pytest.mark.parametrize("subcommand", sorted(NOT_IN))
def test_a_stage_runs_no_writer_export_resume_shard_or_benchmark(
    subcommand: str, stages: dict[str, dict[str, Any]], pkg: Package
) -> None:
    """Editing an output writer, the ONNX export, resume, shards, another stage's entry or a benchmark
    leaves `dvc status` clean for the stages that do not run it."""
    name, stage = next((n, s) for n, s in stages.items() if _subcommands(s) == [subcommand])
    files = set().union(*(stage_code(pkg, c).files for c in [stage["cmd"]]))
    assert files, name
    bad = sorted(f for f in files if f.startswith(NOT_IN[subcommand]))
    assert not bad, f"stage {name} runs (so DVC reruns it when they change): {bad}"
