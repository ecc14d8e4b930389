"""A small, deterministic text corpus from the running Python's standard library docstrings.

Every machine with Python has it and no network is needed. Each document is one docstring
(module, class or function) with its qualified name as a title line; files are visited in sorted
order, so the same Python version gives the same corpus byte for byte.
"""

from __future__ import annotations

import ast
import json
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "ensurepip",
    "turtledemo",
    "pydoc_data",
    "tkinter",
    "idlelib",
}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_docstrings(min_chars: int = 40) -> Iterator[dict]:
    """{"text", "module", "package"} for each docstring of the stdlib, in a fixed order."""
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for qualname, node in _documented(tree, module):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                yield {
                    "text": f"{qualname}\n\n{doc}",
                    "module": module,
                    "package": rel.parts[0].removesuffix(".py"),
                }


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, ast.AST]]:
    yield module, tree
    stack = [(module, n) for n in tree.body]
    while stack:
        prefix, node = stack.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}.{node.name}"
            yield name, node
            if isinstance(node, ast.ClassDef):
                stack.extend((name, n) for n in node.body)


def write_corpus(out_path: str | Path, max_docs: int | None = None) -> int:
    """Write the corpus as JSON lines with a `text` field; returns the number of documents."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        for doc in iter_docstrings():
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
            if max_docs is not None and n >= max_docs:
                break
    return n
