"""The package's architecture, checked on its source: imports point one way, no cycles, no long functions."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "noder_monai"

#: Layers, lowest first. A module may import its own layer's package and any package of a lower layer; packages that
#: share a layer are independent unless ``SIDEWAYS`` allows the arrow.
LAYERS = (
    ("core",),
    ("networks", "losses", "metrics"),
    ("io",),
    ("data",),
    ("model",),
    ("transforms", "engines", "baselines"),
    ("reporting",),
    ("workflows",),
    ("cli",),
)
SIDEWAYS = {("engines", "transforms")}  # the fit's preprocessing is made of transforms
CORE_MODULES = {"noder_monai", "noder_monai.functional", "noder_monai.utils", "noder_monai._deprecated"}
#: Third-party modules that may be imported inside a function: optional, heavy, or needed by one command only.
LAZY_ALLOWED = ("matplotlib", "mlflow", "torch.utils.tensorboard", "tqdm")
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _package(module: str) -> str:
    if module in CORE_MODULES:
        return "core"
    return module.split(".")[1]


def _layer(package: str) -> int:
    return next(index for index, names in enumerate(LAYERS) if package in names)


def _imported(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against this module's package
            base = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
            return [".".join([*base, node.module or ""]).rstrip(".")]
        return [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _imports(tree: ast.Module, module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(noder_monai modules imported at module level, (line, module) imported inside a function or class body)."""
    top, nested = set(), []
    for node in ast.walk(tree):
        names = _imported(node, module)
        if not names:
            continue
        if node in tree.body or any(node in getattr(parent, "body", []) for parent in _top_guards(tree)):
            top.update(n for n in names if n.startswith("noder_monai"))
        else:
            nested.extend((node.lineno, n) for n in names)
    return top, nested


def _top_guards(tree: ast.Module) -> list[ast.AST]:
    """Module-level ``if``/``try`` blocks (e.g. ``if TYPE_CHECKING:``): their imports count as module level."""
    return [node for node in tree.body if isinstance(node, (ast.If, ast.Try))]


SOURCES = {name: (path, tree) for name, path, tree in _modules()}
MODULES = set(SOURCES)


def _known(name: str) -> str | None:
    """The package module ``name`` refers to: ``noder_monai.io.Geometry`` (``from noder_monai.io import Geometry``)
    -> ``noder_monai.io``; ``noder_monai.workflows.markers`` (``from noder_monai.workflows import markers``) -> that
    submodule."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, (_, tree) in SOURCES.items():
        top, _ = _imports(tree, name)
        graph[name] = {known for n in top if (known := _known(n)) and known != name}
    return graph


def test_imports_point_down_the_layers():
    upward = []
    for name, targets in _graph().items():
        source = _package(name)
        for target in targets:
            other = _package(target)
            if other == source or (source, other) in SIDEWAYS:
                continue
            if _layer(other) >= _layer(source):
                upward.append(f"{name} -> {target} ({source} may not import {other})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    graph, state, cycles = _graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_functions_import_only_optional_packages():
    hidden = []
    for name, (path, tree) in SOURCES.items():
        _, nested = _imports(tree, name)
        for line, target in nested:
            if not target.startswith(LAZY_ALLOWED):
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} inside a function")
    assert not hidden, "\n".join(hidden)


def test_no_function_is_longer_than_80_lines():
    long = []
    for name, (path, tree) in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {length} lines")
    assert not long, "\n".join(long)
