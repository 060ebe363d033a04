"""Content hashes of the code that computes a stage's output, for resume fingerprints.

A fingerprint that named only the package version would let a rerun reuse what an older
version of a stage wrote. Instead each stage's fingerprint carries :func:`code_hash` of its
module and every pedsynth module it reaches: ``import`` statements and ``"pedsynth.x.y[:attr]"``
strings (the lazy registries of stages and backends), followed transitively, plus the data files
of the packages it reaches (the prompt files). Sources are hashed as their syntax tree, so a
change to a comment or to formatting does not recompute anything; a change to a docstring or to
the code does.
"""

from __future__ import annotations

import ast
import hashlib
import re
import threading
from functools import lru_cache
from pathlib import Path

ROOT_PACKAGE = "pedsynth"
_MODULE_STRING = re.compile(rf"^{ROOT_PACKAGE}(?:\.\w+)+(?::\w+)?$")
_lock = threading.Lock()
_ROOT = Path(__file__).resolve().parent
# The stage registry names every stage but computes no output: following it would make each
# stage's hash depend on all the others.
NOT_FOLLOWED = frozenset({f"{ROOT_PACKAGE}.tasks.stages", f"{ROOT_PACKAGE}.flows"})


def _module_file(name: str) -> Path | None:
    """The source file of a pedsynth module (a package's ``__init__.py``), or None.

    Found by path under the package folder, without importing anything.
    """
    parts = name.split(".")
    if parts[0] != ROOT_PACKAGE:
        return None
    base = _ROOT.joinpath(*parts[1:])
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=1024)
def _parsed(path: Path, size: int, mtime_ns: int) -> tuple[str, tuple[str, ...]]:
    """(hash of the syntax tree, pedsynth modules named) of one source file."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    package = _package_of(path)
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            if base is None:
                continue
            named.add(base)
            named.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.match(node.value)
        ):
            named.add(node.value.partition(":")[0])
    digest = hashlib.sha256(ast.dump(tree).encode("utf-8")).hexdigest()
    ours = tuple(sorted(n for n in named if n == ROOT_PACKAGE or n.startswith(ROOT_PACKAGE + ".")))
    return digest, ours


def _package_of(path: Path) -> str | None:
    """The dotted package a source file belongs to, for resolving relative imports."""
    parts: list[str] = []
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts) or None


def _absolute(module: str | None, level: int, package: str | None) -> str | None:
    if level == 0:
        return module
    if package is None:
        return None
    base = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join([*base, module] if module else base)


def _data_files(init: Path) -> list[Path]:
    """Non-Python files shipped in a package folder (prompt texts, templates), not descending
    into sub-packages, which are hashed when they are reached themselves."""
    found: list[Path] = []
    stack = [init.parent]
    while stack:
        folder = stack.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                if entry.name != "__pycache__" and not (entry / "__init__.py").exists():
                    stack.append(entry)
            elif entry.suffix not in (".py", ".pyc"):
                found.append(entry)
    return sorted(found)


def all_modules() -> list[str]:
    """Every module of the package (for a hash of the whole code base)."""
    names = []
    for path in _ROOT.rglob("*.py"):
        rel = path.relative_to(_ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        names.append(".".join([ROOT_PACKAGE, *parts]))
    return sorted(names)


def reached_modules(*modules: str) -> list[str]:
    """``modules`` and every pedsynth module they reach, with the packages they live in."""
    seen: set[str] = set()
    stack = list(modules)
    while stack:
        name = stack.pop()
        excluded = any(name == x or name.startswith(x + ".") for x in NOT_FOLLOWED)
        if name in seen or (excluded and name not in modules):
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        stack.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        stat = path.stat()
        stack.extend(_parsed(path, stat.st_size, stat.st_mtime_ns)[1])
    return sorted(seen)


def code_hash(*modules: str) -> str:
    """A 16-hex-digit hash of the code reached from ``modules`` (see the module docstring);
    with no argument, of the whole package."""
    digest = hashlib.sha256()
    with _lock:
        for name in reached_modules(*(modules or all_modules())):
            path = _module_file(name)
            assert path is not None
            stat = path.stat()
            digest.update(f"{name}\0{_parsed(path, stat.st_size, stat.st_mtime_ns)[0]}\0".encode())
            if path.name == "__init__.py":
                for data in _data_files(path):
                    rel = data.relative_to(path.parent).as_posix()
                    digest.update(f"{name}/{rel}\0".encode() + data.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
