"""The package's layers only look down: config/ops/hf_format/fp8.quant -> model -> checkpoint/losses ->
fp8/parallel/plan -> train/inference -> cli. Every `fewchips` import in the source (lazy ones inside
functions included) is read from the AST; an import of a higher layer fails this test unless it is a
known, listed debt."""

import ast
import os

import fewchips

LAYERS = [  # (module prefix, layer), most specific first
    ("fewchips.config", 0), ("fewchips.ops", 0), ("fewchips.files", 0), ("fewchips.lazy", 0), ("fewchips.runtime", 0),
    ("fewchips.checkpoint.hf_format", 0), ("fewchips.fp8.quant", 0),   # the format on disk; FP8 numerics (torch only)
    ("fewchips.model", 1),
    ("fewchips.checkpoint.fp8", 3), ("fewchips.checkpoint.sharded", 3), ("fewchips.checkpoint.run_dir", 4),
    ("fewchips.checkpoint", 2), ("fewchips.losses", 2), ("fewchips.stages", 2),
    ("fewchips.fp8", 3), ("fewchips.parallel", 3), ("fewchips.plan", 3),
    ("fewchips.train", 4), ("fewchips.inference", 4),
    ("fewchips.cli", 5), ("fewchips.demo", 5), ("fewchips.__main__", 5), ("fewchips", 5),
]
# Known upward imports, each with why it is still there (none now).
KNOWN: dict = {}


def layer(module: str):
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return prefix, n
    raise AssertionError(f"{module}: in no layer; add it to LAYERS (and docs/structure.md)")


def imports(root: str):
    """(importing module, imported module) for every fewchips import under root."""
    for folder, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            mod = os.path.relpath(path[:-3], os.path.dirname(root)).replace(os.sep, ".")
            mod = mod[: -len(".__init__")] if mod.endswith(".__init__") else mod
            pkg = mod if f == "__init__.py" else mod.rsplit(".", 1)[0]
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                if isinstance(node, ast.ImportFrom):
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]) if node.level else ""
                    target = ".".join(x for x in (base, node.module) if x)
                    names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                yield from ((mod, t) for t in names if t == "fewchips" or t.startswith("fewchips."))


def upward(root: str):
    out = set()
    for a, b in imports(root):
        (pa, la), (pb, lb) = layer(a), layer(b)
        if lb > la and pa != pb:
            out.add((a, b))
    return out


def test_layers_only_look_down():
    found = upward(os.path.dirname(fewchips.__file__))
    assert found - set(KNOWN) == set(), ("imports of a higher layer: "
                                         + ", ".join(f"{a} -> {b}" for a, b in sorted(found - set(KNOWN))))
    assert set(KNOWN) <= found, "a listed debt is paid: remove it from KNOWN"


def test_the_walk_sees_a_planted_upward_import(tmp_path):
    """The check itself can fail: a copy of the package with model.py importing the trainer is caught."""
    import shutil
    pkg = tmp_path / "fewchips"
    shutil.copytree(os.path.dirname(fewchips.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "model.py", "a") as f:
        f.write("\n\ndef _late():\n    from .train import trainer  # noqa\n")
    assert upward(str(pkg)) - set(KNOWN) == {("fewchips.model", "fewchips.train")}


def circles(root: str) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (lazy imports included)."""
    edges: dict[str, set[str]] = {}
    pairs = list(imports(root))
    modules = {a for a, _ in pairs}
    for a, b in pairs:
        while b not in modules and "." in b and not os.path.exists(
                os.path.join(os.path.dirname(root), *b.split(".")) + ".py"):
            b = b.rsplit(".", 1)[0]                   # `from .linear import X`: the module, not the name
        if b != a:
            edges.setdefault(a, set()).add(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):                                     # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                out.append(sorted(group))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_itself_round_a_circle(tmp_path):
    assert circles(os.path.dirname(fewchips.__file__)) == []
    import shutil
    pkg = tmp_path / "fewchips"                       # the check can fail: a planted runner -> engine import
    shutil.copytree(os.path.dirname(fewchips.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "inference" / "runner.py", "a") as f:
        f.write("\n\ndef _late():\n    from .engine import Engine  # noqa\n")
    assert circles(str(pkg)) == [["fewchips.inference.engine", "fewchips.inference.runner"]]
