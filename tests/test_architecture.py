"""The package's shape: no import cycles, every module imports on its own, no private names across modules, and
nothing in the package reads from tests/."""
import ast
import multiprocessing as mp
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_tropd"
STUBS = PACKAGE / "rollout" / "cpu_stubs"  # the sgl_kernel stand-in is its own top-level package


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if STUBS in path.parents:
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported by `name` anywhere in its body (function-level imports included: hiding a cycle
    behind a lazy import is still a cycle). `if TYPE_CHECKING:` blocks are skipped."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found = set()

    def add(target: str) -> None:
        # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != name:
                found.add(prefix)

    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            add(module)
            for alias in node.names:
                add(f"{module}.{alias.name}")
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package's __init__ importing its own submodules is how packages work, not a cycle back
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"p": {"p.x"}, "p.x": {"q"}, "q": set()}) is None


def test_no_private_names_imported_across_modules():
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("megatron_tropd")):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def _reads_tests(path: Path) -> list[int]:
    """Lines of string literals (docstrings excluded) that name the tests folder: "tests" or "tests/..."."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings and (n.value.strip("/") == "tests" or n.value.startswith("tests/"))]


def test_package_does_not_read_from_tests():
    bad = {str(p.relative_to(ROOT)): lines for p in PACKAGE.rglob("*.py") if (lines := _reads_tests(p))}
    assert not bad, bad


def test_tests_folder_check_sees_path_literals(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""Docs may mention tests/ freely."""\nSTUB = ROOT / "tests" / "stubs"\n')
    assert _reads_tests(f) == [2]


def _import_alone(name: str) -> str | None:
    import importlib

    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return f"{type(e).__name__}: {e}"
    return None


def test_every_module_imports_on_its_own():
    """Each module in a process where no other package module was imported (forked from a parent that has only
    the heavy third-party libraries loaded, so the check stays fast)."""
    names = sorted(_modules())
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "megatron.core", "transformers"])
    with ctx.Pool(2, maxtasksperchild=1) as pool:
        results = pool.map(_import_alone, names, chunksize=1)
    failed = {n: r for n, r in zip(names, results) if r}
    assert not failed, failed
