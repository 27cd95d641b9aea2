"""Layers point one way (STYLE.md 13): the runtime core never imports the converter or the CLI,
no module imports itself back through others, and imports inside functions are the few listed here.

The import graph comes from parsing the sources with `ast` (nothing is imported) and counts
imports inside functions too: a function-level import that dodges a cycle is still a cycle.
A module's implicit import of its parent package is not an edge; `import gemma3_mlx` or
`from gemma3_mlx import load` in a submodule is (gemma3_mlx/__init__.py imports the submodules).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# pyproject.toml's package-dir: convert/ and cli/ install as gemma3_mlx.convert and gemma3_mlx.cli.
PACKAGES = {"gemma3_mlx": "gemma3_mlx", "gemma3_mlx.convert": "convert", "gemma3_mlx.cli": "cli"}
ABOVE_CORE = ("gemma3_mlx.convert", "gemma3_mlx.cli")
# Every module of gemma3_mlx/ is core except the package's front door and the model registry,
# which converts a GGUF or hub model on first use and so sits above the converter.
NOT_CORE = {"gemma3_mlx", "gemma3_mlx.models"}

# First-party imports inside functions, (importer, imported module or a package above it): why.
LAZY = {
    ("gemma3_mlx.models", "gemma3_mlx.convert"): "start-up: the converter imports gguf (~80 ms), needed only on a model's first use",
    ("gemma3_mlx.cli.main", "gemma3_mlx.convert"): "start-up: `gemma3 --help` and generation never need the converter",
    ("gemma3_mlx.cli.main", "gemma3_mlx.cli.serve"): "start-up: uvicorn and starlette (~0.2-0.4 s) only for `gemma3 serve`",
}


def modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the three packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = f
    return out


def is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(first-party module imported, line, inside a function) for each import in one module."""
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from the module's package, one package up per extra dot
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([child.module] if child.module else []))
                else:
                    base = child.module
                for a in child.names:  # `from pkg import mod` imports pkg.mod; `from pkg import obj`, pkg
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in known else base, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return sorted({(m, line, f) for m, line, f in found if is_under(m, "gemma3_mlx")}, key=lambda e: e[1])


MODULES = modules()
EDGES = [(m, target, line, in_function)
         for m, path in MODULES.items() for target, line, in_function in imports(m, path, set(MODULES))]


def where(m: str, line: int) -> str:
    return f"{MODULES[m].relative_to(ROOT)}:{line}"


def path_to(start: str, goal) -> list[str] | None:
    """A shortest import path from `start` to a module satisfying `goal`, or None."""
    graph = {}
    for a, b, _, _ in EDGES:
        graph.setdefault(a, set()).add(b)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        if goal(path[-1]) and len(path) > 1:
            return path
        for n in sorted(graph.get(path[-1], ())):
            if n not in seen:
                seen.add(n)
                paths.append(path + [n])
    return None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []  # state: 1 on the current path, 2 finished

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_package_dirs_match_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-dir"] == PACKAGES


def test_first_party_imports_name_existing_modules():
    missing = [f"{where(m, line)}: {target}" for m, target, line, _ in EDGES
               if target not in MODULES]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_core_never_reaches_converter_or_cli():
    core = [m for m in MODULES if is_under(m, "gemma3_mlx") and not any(is_under(m, p) for p in ABOVE_CORE)
            and m not in NOT_CORE]
    assert "gemma3_mlx.loader" in core
    bad = [path_to(m, lambda n: any(is_under(n, p) for p in ABOVE_CORE)) for m in core]
    bad = [" -> ".join(p) for p in bad if p]
    assert not bad, "the core imports the converter or the CLI (counting imports inside functions):\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {}
    for a, b, _, _ in EDGES:
        graph.setdefault(a, set()).add(b)
    cycles = []
    while cycle := find_cycle(graph):
        cycles.append(" -> ".join(cycle))
        graph[cycle[-2]].discard(cycle[-1])  # break it, to report the next one
    assert not cycles, "import cycles (counting imports inside functions):\n" + "\n".join(cycles)


def test_function_level_imports_are_listed():
    unlisted = [f"{where(m, line)}: {target}" for m, target, line, in_function in EDGES
                if in_function and not any(m == a and is_under(target, b) for a, b in LAZY)]
    assert not unlisted, ("first-party imports inside functions (move them to the top of the module, "
                          "or list them in LAZY with the reason):\n" + "\n".join(unlisted))


def test_lazy_allow_list_is_current():
    used = {(a, b) for a, b in LAZY for m, target, _, in_function in EDGES
            if in_function and m == a and is_under(target, b)}
    assert set(LAZY) == used, f"LAZY entries no import needs any more (remove them): {sorted(set(LAZY) - used)}"


def test_the_model_knows_nothing_of_distribution():
    path = path_to("gemma3_mlx.model", lambda n: n in ("gemma3_mlx.shard", "gemma3_mlx.distributed"))
    assert path is None, "model.py reaches the distributed code: " + " -> ".join(path)


def test_the_model_call_is_plain_ids_and_cache_to_logits():
    """`Model.__call__(input_ids, cache)`: no images, output modes or pipeline arguments (forward.py has
    those), and nothing in model.py reads a group, a stage or the vision encoder's entry point."""
    import inspect

    from gemma3_mlx.model import Model

    assert list(inspect.signature(Model.__call__).parameters) == ["self", "input_ids", "cache"]
    names = {n.attr if isinstance(n, ast.Attribute) else n.id if isinstance(n, ast.Name) else n.arg
             for n in ast.walk(ast.parse(MODULES["gemma3_mlx.model"].read_text()))
             if isinstance(n, (ast.Attribute, ast.Name, ast.arg))}
    assert {"make_cache", "embed_tokens", "QuantizedKVCache"} <= names  # the walk sees the module's code
    found = names & {"group", "stage", "agree", "pixel_values", "image_features", "encode_images", "all_sum", "send",
                     "recv", "distributed", "logits"}
    assert not found, f"model.py uses {sorted(found)}"


SAMPLING = ("temp", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
SETTINGS = "gemma3_mlx.settings"


def sampling_defaults(m: str) -> list[str]:
    """Where module `m` gives a sampling setting a default of its own: a parameter `temp=0.0` (or a typer
    option's first argument), a class field `top_p: float = 1.0`, a keyword `min_p=0.05` passed to a
    function whose argument is not a name. None is not a default: it says "the settings' default"."""
    found = []

    def own(value) -> bool:
        if isinstance(value, ast.Call) and value.args and getattr(value.func, "attr", "") == "Option":
            value = value.args[0]  # typer.Option(default, "--flag", ...)
        return isinstance(value, ast.Constant) and value.value is not None and value.value is not ...

    for node in ast.walk(ast.parse(MODULES[m].read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
            found += [f"{where(m, d.lineno)}: {arg.arg}" for arg, d in pairs if arg.arg in SAMPLING and d and own(d)]
        elif isinstance(node, ast.ClassDef):
            found += [f"{where(m, s.lineno)}: {s.target.id}" for s in node.body if isinstance(s, ast.AnnAssign)
                      and isinstance(s.target, ast.Name) and s.target.id in SAMPLING and s.value and own(s.value)]
    return found


def test_sampling_defaults_are_defined_once():
    assert sampling_defaults(SETTINGS), "settings.py should hold the defaults (has the checker gone blind?)"
    # The converter's calibration seed is not a sampling setting.
    others = [hit for m in MODULES if m != SETTINGS and not is_under(m, "gemma3_mlx.convert") for hit in sampling_defaults(m)]
    assert not others, "sampling defaults outside gemma3_mlx/settings.py:\n" + "\n".join(others)
