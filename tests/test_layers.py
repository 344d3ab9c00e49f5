"""The layers point one way (docs/design.md): every import of every file, read from its AST
(imports inside functions and under TYPE_CHECKING included, relative imports resolved), is
checked against the rules below. A wrong-way import fails with the file, line and rule."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modules", "datamodules", "trainers", "tools")
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from .. import y
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import flow` imports the submodule flow
                found += [(node.lineno, target if node.module else f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def subcommand_of(name: str) -> str | None:
    """The subcommand a tools module belongs to (tools.bench.net -> bench); None for tools.cli and
    shared helpers (tools.common)."""
    parts = name.split(".")
    if parts[0] != "tools" or len(parts) < 2 or parts[1] in ("cli", "common", "__init__"):
        return None
    return parts[1]


def violations(root: Path) -> list[str]:
    """Every import of the project's packages under `root` that breaks a layer rule."""
    bad = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            me = module_name(path, root)
            for line, target in imports(path, root):
                top = target.split(".")[0]
                where = f"{path.relative_to(root)}:{line} imports {target}"
                if me.startswith("modules.nets"):
                    if top not in STDLIB and top != "torch" and not target.startswith("modules.nets"):
                        bad.append(f"{where}: modules/nets/ imports only torch and itself")
                if top not in PACKAGES:
                    continue
                if pkg == "datamodules" and top != "datamodules":
                    bad.append(f"{where}: datamodules/ imports none of modules/, trainers/, tools/")
                elif pkg == "modules" and top in ("trainers", "tools"):
                    bad.append(f"{where}: modules/ never imports trainers/ or tools/")
                elif pkg == "trainers" and top == "tools":
                    bad.append(f"{where}: trainers/ never imports tools/")
                elif pkg == "tools" and top == "tools":
                    mine, theirs = subcommand_of(me), subcommand_of(target)
                    if theirs is not None and theirs != mine:
                        bad.append(f"{where}: a subcommand imports cli.py and shared helpers, not another subcommand")
    return bad


def cycles(root: Path) -> list[str]:
    """Import cycles between the project's modules (each reported once, by its members)."""
    graph: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            me = module_name(path, root)
            graph[me] = {t for _, t in imports(path, root) if t.split(".")[0] in PACKAGES and t != me}
    for me in graph:  # `from pkg import sub` lands on pkg.sub when that is a module
        graph[me] = {t if t in graph else t.rpartition(".")[0] for t in graph[me]} & set(graph)
    found, done = set(), set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            found.add(" -> ".join(sorted(stack[stack.index(node) :])))
            return
        if node in done:
            return
        for nxt in graph[node]:
            if not (node == nxt.rpartition(".")[0] or nxt == node.rpartition(".")[0]):  # a package and its parts
                visit(nxt, stack + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return sorted(found)


def test_layers_point_one_way():
    bad = violations(ROOT)
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_project_modules():
    assert not cycles(ROOT), "\n".join(cycles(ROOT))


def test_outside_tools_only_tests_import_tools():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {t}"
        for top in ("recipes", "docs")
        for p in (ROOT / top).rglob("*.py")
        for line, t in imports(p, ROOT)
        if t.split(".")[0] == "tools"
    ]
    assert not bad, "\n".join(bad)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for pkg in PACKAGES:
        (root / pkg).mkdir(exist_ok=True)


def test_the_checker_finds_each_kind_of_wrong_way_import(tmp_path):
    """The rules bite: each wrong-way import below is found (inside a function, under
    TYPE_CHECKING and as a relative import too), and the allowed ones are not."""
    write(
        tmp_path,
        {
            "modules/__init__.py": "",
            "modules/nets/__init__.py": "",
            "modules/nets/dit.py": "import torch\nfrom ..denoiser import Cond\nimport lightning\n",
            "modules/denoiser.py": "from .nets import dit\n",
            "modules/stage.py": "def f():\n    from trainers.fsdp import shard\n",
            "modules/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tools import cli\n",
            "datamodules/__init__.py": "",
            "datamodules/video.py": "from modules.denoiser import Cond\n",
            "trainers/__init__.py": "",
            "trainers/cli.py": "from modules.stage import f\nfrom tools.quickstart import x\n",
            "tools/__init__.py": "",
            "tools/cli.py": "",
            "tools/report.py": "from tools.cli import main\nfrom tools.quickstart import RUNS\n",
            "tools/quickstart.py": "from . import cli\nfrom .report import write_report\n",
            "tools/bench/__init__.py": "from .net import run\n",
            "tools/bench/net.py": "from .common import x\n",
            "tools/bench/common.py": "",
        },
    )
    found = "\n".join(violations(tmp_path))
    for expected in (
        "modules/nets/dit.py:2 imports modules.denoiser",
        "modules/nets/dit.py:3 imports lightning",
        "modules/stage.py:2 imports trainers.fsdp",
        "modules/typed.py:3 imports tools",
        "datamodules/video.py:1 imports modules.denoiser",
        "trainers/cli.py:2 imports tools.quickstart",
        "tools/report.py:2 imports tools.quickstart",
        "tools/quickstart.py:2 imports tools.report",
    ):
        assert expected in found, f"{expected!r} not reported:\n{found}"
    assert "tools/bench" not in found and "imports tools.cli" not in found and "trainers/cli.py:1" not in found
    assert len(found.splitlines()) == 8, found
    write(tmp_path, {"modules/a.py": "from . import b\n", "modules/b.py": "from modules.a import x\n"})
    assert cycles(tmp_path) == ["modules.a -> modules.b", "tools.quickstart -> tools.report"]


def code_lines(func: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of code of a function: its lines without the docstring, blank lines and comments."""
    body = func.body
    skip = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    code = [source[i - 1].strip() for i in range(func.lineno, func.end_lineno + 1) if i not in skip]
    return sum(1 for line in code if line and not line.startswith("#"))


def long_functions(root: Path, limit: int = 80) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = code_lines(node, source)
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: {n} lines of code")
    return found


def test_tools_are_thin():
    """Subcommands parse arguments and call the layers below: no function in tools/ is over 80
    lines of code (docstrings, blank lines and comments aside)."""
    assert not long_functions(ROOT / "tools"), "\n".join(long_functions(ROOT / "tools"))
