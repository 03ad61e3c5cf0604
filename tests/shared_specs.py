"""Where the real Meta-Dataset dataset_spec.json files are: `shared/` beside the repository (CI lays a copy
there), else the workplace's /work/shared. Tests that need them fail loudly if neither exists."""

from pathlib import Path

_CANDIDATES = [Path(__file__).resolve().parents[2] / "shared" / "data" / "md_specs",
               Path("/work/shared/data/md_specs")]
SPECS_DIR = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
