"""The one-way doors: manifests and lite_train never import TensorFlow/TFDS; convert never imports torch;
manifests imports pyarrow and numpy (and, lazily for decoding only, simplejpeg and PIL).

Each check runs in a fresh interpreter, because this test process has already imported torch (conftest).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import sys
{imports}
for argv in {clis!r}:
    module, *args = argv
    sys.argv = [module] + args
    try:
        __import__(module, fromlist=["main"]).main()
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})
print("LOADED:" + ",".join(loaded))
"""


def _loaded_forbidden(imports: list[str], clis: list[list[str]], forbidden: set[str]) -> str:
    code = _PROBE.format(imports="\n".join(f"import {m}" for m in imports), clis=clis, forbidden=forbidden)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1].removeprefix("LOADED:")


def _modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    )


def test_manifests_and_lite_train_never_import_tensorflow():
    clis = [["lite_train.cli", "--help"], ["lite_train.cli", "describe", "--help"],
            ["lite_train.cli", "episodes", "--help"]]
    imports = _modules("manifests") + _modules("lite_train")
    assert _loaded_forbidden(imports, clis, {"tensorflow", "tensorflow_datasets", "convert"}) == ""


def test_convert_never_imports_torch():
    if not (ROOT / "convert" / "cli.py").exists():
        pytest.fail("convert/cli.py is missing")
    clis = [["convert.cli", "--help"]]
    assert _loaded_forbidden(_modules("convert"), clis, {"torch", "torchvision", "lite_train"}) == ""


# What manifests may import besides the standard library and itself: pyarrow and numpy at module level;
# manifests/decode.py (the byte decoder shared by `lite-convert verify --decode` and the runtime) also the two
# codecs, inside the functions that decode, so that importing manifests never loads them.
MANIFESTS_MODULE_LEVEL = {"pyarrow", "numpy"}
MANIFESTS_LAZY = {"manifests/decode.py": {"simplejpeg", "PIL"}}


def _third_party_imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level package names a module imports outside the standard library: (module level, inside functions)."""
    module_level, lazy = set(), set()
    tree = ast.parse(path.read_text(), str(path))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = {node.module.split(".")[0]}
        else:
            continue
        (lazy if id(node) in inside else module_level).update(names - set(sys.stdlib_module_names) - {"manifests"})
    return module_level, lazy


def test_manifests_imports_only_pyarrow_numpy_and_the_decoders_lazy_codecs():
    files = sorted((ROOT / "manifests").rglob("*.py"))
    assert ROOT / "manifests" / "decode.py" in files
    for path in files:
        module_level, lazy = _third_party_imports(path)
        rel = path.relative_to(ROOT).as_posix()
        assert module_level <= MANIFESTS_MODULE_LEVEL, (rel, module_level)
        assert lazy <= MANIFESTS_MODULE_LEVEL | MANIFESTS_LAZY.get(rel, set()), (rel, lazy)


def test_manifests_imports_nothing_heavier_than_pyarrow_and_numpy():
    heavy = {"torch", "torchvision", "tensorflow", "PIL", "simplejpeg", "pandas", "lite_train", "convert"}
    assert _loaded_forbidden(_modules("manifests"), [], heavy) == ""


def test_decoding_through_manifests_loads_neither_torch_nor_tensorflow():
    import numpy as np
    import simplejpeg

    jpeg = simplejpeg.encode_jpeg(np.full((8, 8, 1), 128, np.uint8), 75, "GRAY")
    code = (f"import sys\nfrom manifests.decode import decode_rgb\nassert decode_rgb({jpeg!r}).shape == (8, 8, 3)\n"
            "import PIL.Image, io\nb = io.BytesIO()\nPIL.Image.new('RGB', (4, 3)).save(b, 'PNG')\n"
            "assert decode_rgb(b.getvalue()).shape == (3, 4, 3)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'tensorflow', 'lite_train', 'convert'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["convert", "manifests"])
def test_every_lazy_export_resolves_to_its_defining_module(package):
    # The package __init__s export their API lazily (PEP 562); each name must be listed once and resolve.
    import importlib

    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(module._EXPORTS)
    for name in module.__all__:
        value = getattr(module, name)
        assert getattr(importlib.import_module(module._EXPORTS[name]), name) is value, name


def test_importing_the_converter_cli_loads_no_vtab_demo_or_verify_code():
    # Start-up is part of every `lite-convert md` run's time (BENCHMARKS.md, converter rows).
    code = ("import sys, convert.cli; print(sorted(m for m in sys.modules if m in "
            "{'convert.vtab', 'convert.demo_data', 'convert.mnist', 'convert.compare', 'manifests.verify',"
            " 'manifests.ordered_writer'}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


PACKAGES = ("convert", "manifests", "lite_train")


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _project_imports(path: Path, modules: set[str]) -> list[tuple[str, str]]:
    """(imported project module, name) for every import in the file, at any depth (lazy imports too);
    `from package import submodule` counts as importing the submodule."""
    me = _module_of(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, "") if sub in modules else (base, alias.name))
    return found


def _project_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_import_circle_between_project_modules():
    # Lazy (function-level) imports count too: a circle hidden inside a function is still a circle.
    files = _project_files()
    modules = {_module_of(p) for p in files}
    graph = {_module_of(p): {m for m, _ in _project_imports(p, modules) if m in modules and m != _module_of(p)}
             for p in files}
    # Tarjan's strongly connected components: any with more than one module is a circle.
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == [], circles


def test_no_private_name_is_imported_from_another_module():
    files = _project_files()
    modules = {_module_of(p) for p in files}
    offenders = [(p.relative_to(ROOT).as_posix(), f"{m}.{name}") for p in files
                 for m, name in _project_imports(p, modules)
                 if name.startswith("_") and not name.startswith("__") and m != _module_of(p)]
    assert offenders == [], offenders
