"""The house rules a reader can check by machine: small functions and classes, dependencies that point one way
(no import circle), and docs that link only to what the repository holds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_FUNCTION, MAX_CLASS = 100, 300


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def test_no_function_over_100_lines_and_no_class_over_300():
    long = []
    for name, f in _modules().items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def _imports(name: str, f: Path, mods: dict[str, Path]) -> set[str]:
    """The sdmoe modules `name` imports, at any depth of its body (a function-level import counts)."""
    package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in mods and t != name}
    return out


def test_no_import_circle():
    mods = _modules()
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    # a package's __init__ may name its submodules (lazy exports resolve them on first use): only
    # module-to-module edges count
    graph = {m: {t for t in ts if not (mods[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, ts in graph.items()}
    circles, seen = [], set()

    def walk(node, path):
        for nxt in graph[node]:
            if nxt in path:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                walk(nxt, [*path, nxt])

    for m in sorted(graph):
        if m not in seen:
            seen.add(m)
            walk(m, [m])
    assert not circles, circles[:5]


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_docs_link_only_inside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue  # the web (the paper, the peer projects) is not the repository's to hold
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{doc.name} links {target}"
    assert "shared/design" not in text and "../shared" not in text, f"{doc.name} points outside the repository"
