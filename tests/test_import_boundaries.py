"""The one-way doors: manifests and lite_train never import TensorFlow/TFDS; convert never imports torch.

Each check runs in a fresh interpreter, because this test process has already imported torch (conftest).
"""

from __future__ import annotations

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


def test_manifests_imports_nothing_heavier_than_pyarrow_and_numpy():
    heavy = {"torch", "torchvision", "tensorflow", "PIL", "simplejpeg", "pandas", "lite_train", "convert"}
    assert _loaded_forbidden(_modules("manifests"), [], heavy) == ""
