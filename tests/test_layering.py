"""Imports point one way, kernels <- moe_core <- parallel <- launcher, no two modules import each other in a
circle, and launcher/data/'s reading side never imports its writing side (nor the reverse; both share format.py). Read from the source with ast (nothing is imported), so a violation fails with its file, line and import.

docs/architecture.md draws the layers; this test is what keeps the drawing true.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "moe_core", "parallel", "launcher")  # a package may import only those to its left
RANK = {name: i for i, name in enumerate(LAYERS)}
NO_DISTRIBUTED = ("kernels", "moe_core")  # single-device math never touches torch.distributed
DATA_SIDES = {  # launcher/data/: each module is on one side, or shared by both (SHARED); no import crosses sides
    "writing": ("preprocess", "inputs", "tokenizer", "writer", "output"),
    "reading": ("build", "loader", "reader", "mixture", "synthetic", "batch"),
}
DATA_SHARED = ("__init__", "format")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Absolute module named by a (possibly relative) ``from ... import``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, root: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, source text) for every import in the file, at any depth (lazy imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    module, is_package = _module_name(path, root), path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, ast.unparse(node)) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            # `from pkg import mod` imports the submodule pkg.mod when it exists
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_sub = (root / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (root / Path(*sub.split(".")) / "__init__.py").is_file()
                out.append((node.lineno, sub if is_sub else target, ast.unparse(node)))
    return out


def source_files(root: Path) -> list[Path]:
    return sorted(p for pkg in LAYERS for p in (root / pkg).rglob("*.py"))


def layering_violations(root: Path) -> list[str]:
    """One line per import that points right (to a higher layer) or reaches torch.distributed from below parallel."""
    bad = []
    for path in source_files(root):
        own = path.relative_to(root).parts[0]
        for line, target, text in imports_of(path, root):
            top = target.split(".")[0]
            where = f"{path.relative_to(root)}:{line}: `{text}`"
            if top in RANK and RANK[top] > RANK[own]:
                bad.append(f"{where} imports {top}/ from {own}/ (allowed: {', '.join(LAYERS[:RANK[own] + 1])})")
            if own in NO_DISTRIBUTED and target.startswith("torch.distributed"):
                bad.append(f"{where} uses torch.distributed inside {own}/ (process groups belong to parallel/)")
    return bad


def data_side_violations(root: Path) -> list[str]:
    """One line per import in launcher/data/ from one side (reading, writing) into the other, and per module that is
    on no side."""
    side_of = {f"launcher.data.{m}": side for side, mods in DATA_SIDES.items() for m in mods}
    bad = []
    for path in sorted((root / "launcher" / "data").glob("*.py")):
        own = side_of.get(_module_name(path, root))
        if own is None:
            if path.stem not in DATA_SHARED:
                bad.append(f"{path.relative_to(root)}: on no side of launcher/data/ (add it to DATA_SIDES)")
            continue
        for line, target, text in imports_of(path, root):
            other = side_of.get(target)
            if other is not None and other != own:
                bad.append(f"{path.relative_to(root)}:{line}: `{text}` imports the {other} side from the {own} side "
                           "(share code through launcher/data/format.py)")
    return list(dict.fromkeys(bad))  # one line per import statement, not per imported name


def import_cycles(root: Path) -> list[str]:
    """Each cycle among our own modules, as 'a -> b -> a' with the line of the first edge."""
    files = {_module_name(p, root): p for p in source_files(root)}
    edges: dict[str, dict[str, int]] = {m: {} for m in files}
    for mod, path in files.items():
        for line, target, _ in imports_of(path, root):
            while target and target not in files:  # `from a.b import name` -> module a.b
                target = target.rpartition(".")[0]
            if target and target != mod and not mod.startswith(target + "."):  # importing one's own package is fine
                edges[mod].setdefault(target, line)
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                loop = stack[stack.index(n):] + [n]
                cycles.append(f"{files[m].relative_to(root)}:{edges[m][n]}: cycle {' -> '.join(loop)}")
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(files):
        if m not in state:
            visit(m)
    return cycles


def test_imports_point_one_way():
    bad = layering_violations(ROOT)
    assert not bad, "imports that point the wrong way:\n" + "\n".join(bad)


def test_data_reading_never_imports_writing():
    bad = data_side_violations(ROOT)
    assert not bad, "launcher/data/ imports across sides:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles(ROOT)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.fixture
def tree(tmp_path):
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    return tmp_path


def test_reports_a_wrong_way_import_with_file_and_line(tree):
    (tree / "launcher" / "config.py").write_text("class Config: ...\n")
    (tree / "moe_core" / "layer.py").write_text("import torch\n\n\ndef f():\n    from launcher.config import Config\n")
    assert layering_violations(tree) == [
        "moe_core/layer.py:5: `from launcher.config import Config` imports launcher/ from moe_core/ "
        "(allowed: kernels, moe_core)"]


def test_reports_torch_distributed_below_parallel(tree):
    (tree / "kernels" / "k.py").write_text("import torch.distributed as dist\n")
    assert layering_violations(tree) == [
        "kernels/k.py:1: `import torch.distributed as dist` uses torch.distributed inside kernels/ "
        "(process groups belong to parallel/)"]


def test_reports_a_data_reader_importing_the_writer(tree):
    (tree / "launcher" / "data").mkdir()
    for name in ("__init__", "format", "writer"):
        (tree / "launcher" / "data" / f"{name}.py").write_text("")
    (tree / "launcher" / "data" / "reader.py").write_text("from launcher.data.format import SAMPLE_EXT\n"
                                                           "from launcher.data import writer\n")
    (tree / "launcher" / "data" / "stray.py").write_text("")
    assert data_side_violations(tree) == [
        "launcher/data/reader.py:2: `from launcher.data import writer` imports the writing side from the reading side "
        "(share code through launcher/data/format.py)",
        "launcher/data/stray.py: on no side of launcher/data/ (add it to DATA_SIDES)"]


def test_reports_a_cycle(tree):
    (tree / "parallel" / "a.py").write_text("from parallel import b\n")
    (tree / "parallel" / "b.py").write_text("x = 1\n\n\ndef f():\n    from parallel.a import y\n")
    assert import_cycles(tree) == ["parallel/b.py:5: cycle parallel.a -> parallel.b -> parallel.a"]


def test_relative_imports_are_resolved(tree):
    (tree / "kernels" / "sub").mkdir()
    (tree / "kernels" / "sub" / "__init__.py").write_text("")
    (tree / "kernels" / "sub" / "m.py").write_text("from ...parallel import groups\n")
    (tree / "parallel" / "groups.py").write_text("")
    assert layering_violations(tree) == [
        "kernels/sub/m.py:1: `from ...parallel import groups` imports parallel/ from kernels/ (allowed: kernels)"]
