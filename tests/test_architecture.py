"""The package's shape: no import cycles, imports at the top, and a tree the README and docstrings describe."""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "codeaccel"
README = Path(__file__).resolve().parents[1] / "README.md"
# imported inside a function only where optional or heavy: loaded on use, never at import time
LAZY = (
    "torch",
    "transformers",
    "llama_cpp",
    "matplotlib",
    "gguf",
    "uvicorn",
    "codeaccel.serve.app",
    "ray",
    "codeaccel.serve.replicas",
    "psycopg",
    "peft",
    "openai",  # the client of a cascade's endpoint stage (extra: endpoint)
)  # + the web stack


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """The codeaccel modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("codeaccel")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("codeaccel"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules_or_between_systems():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []

    def system(module: str) -> str:  # codeaccel.retrieval.drafter -> retrieval; codeaccel.errors -> errors
        return module.split(".")[1] if "." in module else module

    systems: dict[str, set[str]] = {}
    for name, targets in graph.items():
        systems.setdefault(system(name), set()).update(system(t) for t in targets if system(t) != system(name))
    assert cycles(systems) == []


def test_imports_are_at_the_top_unless_optional_or_heavy():
    inside = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import | ast.ImportFrom):
                        target = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                        if not any(target == lazy or target.startswith(lazy + ".") for lazy in LAZY):
                            inside.append(f"{name}:{sub.lineno} {target}")
    assert inside == []


def layout_entries() -> set[str]:
    """The paths the README's layout block lists under src/codeaccel/ (directories end with /)."""
    text = README.read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    entries, stack = set(), []
    in_package = False
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        token = line.split()[0]
        if depth == 0:
            in_package = token == "src/codeaccel/"
            stack = []
            continue
        if not in_package or not (token.endswith("/") or token.endswith(".py")):
            continue  # a continuation of a description
        del stack[depth - 1 :]
        entries.add("".join(stack) + token)
        if token.endswith("/"):
            stack.append(token)
    return entries


def test_the_readme_layout_lists_exactly_the_tree():
    actual = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")}
    actual |= {str(p.relative_to(SRC)) + "/" for p in SRC.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    listed = layout_entries()
    assert sorted(actual - listed) == [], "in the tree, not in the README's layout"
    assert sorted(listed - actual) == [], "in the README's layout, not in the tree"


def test_every_subpackage_docstring_names_its_modules():
    missing = []
    for init in sorted(SRC.rglob("__init__.py")):
        if init.parent == SRC:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for module in sorted(init.parent.glob("*.py")):
            if module.name != "__init__.py" and not re.search(rf"\b{module.stem}\b", doc):
                missing.append(f"{init.parent.name}/{module.name}")
        for sub in sorted(p for p in init.parent.iterdir() if (p / "__init__.py").is_file()):
            if not re.search(rf"\b{sub.name}\b", doc):
                missing.append(f"{init.parent.name}/{sub.name}/")
    assert missing == []
