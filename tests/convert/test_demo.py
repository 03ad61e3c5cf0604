"""`make demo` in miniature: demo-data -> md (2 workers) -> mnist -> verify --decode; demo data is seeded."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from convert.cli import app
from manifests.md_spec import load_md_spec

runner = CliRunner()


def test_demo_pipeline_converts_and_verifies(tmp_path):
    records, shards = tmp_path / "records", tmp_path / "shards"
    for args in (["demo-data", str(records), "--seed", "3"],
                 ["md", "--records", str(records), "--out", str(shards), "--workers", "2"],
                 ["mnist", "--idx-dir", str(records / "mnist_idx"), "--out", str(shards)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    glyphs = load_md_spec(records / "demo_glyphs" / "dataset_spec.json")
    assert glyphs.kind == "bilevel" and glyphs.superclasses_per_split == {"train": 4, "valid": 2, "test": 2}
    assert all(10 <= n <= 14 for n in glyphs.classes_per_superclass)
    textures = load_md_spec(records / "demo_textures" / "dataset_spec.json")
    assert textures.kind == "flat" and textures.classes_per_split == {"train": 20, "valid": 5, "test": 5}
    assert list(json.loads((records / "demo_glyphs" / "dataset_spec.json").read_text()))[-1] == "__class__"
    result = runner.invoke(app, ["verify", str(shards), "--decode"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["ok md/demo_glyphs", "ok md/demo_textures", "ok md/mnist"]
    assert "1000 samples" in lines[2] and "1000 decoded" in lines[2]


def test_demo_data_is_deterministic_for_a_seed(tmp_path):
    from convert.demo_data import write_demo_data

    a, b = write_demo_data(tmp_path / "a", seed=1), write_demo_data(tmp_path / "b", seed=1)
    for x, y in zip(a, b):
        files = sorted(p.name for p in x.iterdir())
        assert files == sorted(p.name for p in y.iterdir())
        for name in files:
            assert (x / name).read_bytes() == (y / name).read_bytes(), name
