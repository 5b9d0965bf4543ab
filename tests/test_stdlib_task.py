"""The standard-library corpus and docstring task (lowmem:stdlib*, the quality benchmark's data), data.val_path, the
base model's pretraining, and bench_quality.py --quick end to end on a micro model."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_jsonl
from lowmem import assets
from lowmem.config import DataConfig, load_config
from lowmem.data import build_datasets
from lowmem.errors import ConfigError
from lowmem.stdlib_corpus import docstring_pairs, split_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stdlib_rows():
    folder = assets.stdlib_dataset()
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines()] for path in folder.glob("*.jsonl")}


def test_splits_share_no_module_and_the_corpus_holds_no_held_out_module(stdlib_rows):
    modules = {name: {row["module"] for row in rows} for name, rows in stdlib_rows.items()}
    assert modules["docstrings"].isdisjoint(modules["docstrings-val"] | modules["docstrings-test"])
    assert modules["docstrings-val"].isdisjoint(modules["docstrings-test"])
    assert modules["corpus"].isdisjoint(modules["docstrings-val"] | modules["docstrings-test"])
    assert modules["corpus-heldout"] >= modules["docstrings-test"]
    for name, split in [("docstrings", "train"), ("docstrings-val", "val"), ("docstrings-test", "test"),
                        ("corpus", "train"), ("corpus-heldout", "test")]:
        assert {split_of(m) for m in modules[name]} == {split}, name
    # every split is large enough to measure on, and every answer is a summary taken out of its function
    assert min(len(stdlib_rows[n]) for n in ("docstrings-val", "docstrings-test")) >= 100
    for row in stdlib_rows["docstrings-test"][:50]:
        assert row["output"] not in row["input"] and row["input"].lstrip().startswith(("def ", "async def ", "@"))


def test_docstring_pairs_remove_the_docstring_and_keep_the_rest():
    source = textwrap.dedent('''
        class A:
            @staticmethod
            def scale(x, factor=2):
                """Multiply x by
                the factor.

                Details that are not the summary.
                """
                y = x * factor
                return y

            def only_doc(self):
                """A function whose body is its docstring alone."""

        def short():
            """Too short."""
            return 1
    ''')
    ((code, summary),) = docstring_pairs(source)
    assert summary == "Multiply x by the factor."
    assert code == "@staticmethod\ndef scale(x, factor=2):\n    y = x * factor\n    return y"
    assert docstring_pairs("def broken(:\n") == []


def test_val_path_holds_out_its_own_rows(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"train row {i}"} for i in range(10)])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out one"}, {"text": "held out two"}])
    data = build_datasets(DataConfig(path=train, val_path=val, packing=False), tokenizer, seed=0)
    assert len(data.train) == 10 and len(data.val) == 2
    assert tokenizer.decode(data.val[0].input_ids, skip_special_tokens=True) == "held out one"
    default = build_datasets(DataConfig(path=train, packing=False), tokenizer, seed=0)
    assert (len(default.train), len(default.val)) == (9, 1)  # without val_path: 5% of the rows, at least one
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: x}}\ndata: {{path: {train}, val_path: {val}}}\n")
    assert load_config(recipe).data.held_out_fraction() == 0.0
    with pytest.raises(ConfigError, match="data.val_fraction 0.1 and data.val_path both choose"):
        load_config(recipe, ["data.val_fraction=0.1"])


def test_pretraining_the_base_model_exports_a_model_and_its_held_out_losses(tmp_path):
    from lowmem.model import load_model

    assets.pretrain_stdlib_model(tmp_path / "base", steps=2, shape="micro-llama")
    records = [json.loads(line) for line in (tmp_path / "base" / "pretrain_metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[1]["val_loss"] < evals[0]["val_loss"]
    model = load_model(str(tmp_path / "base"))
    assert model.config.hidden_size == assets.TINY_MODELS["micro-llama"][1]


def test_quick_quality_benchmark_runs_and_resumes(tmp_path, micro_model_path):
    """The pipeline (runs, evaluation, table, plot, resume), not the figures: 2 steps of a random micro model."""
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--quick", "--base", micro_model_path,
               "--steps", "2", "--eval-every", "1", "--threads", "1", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert rows["AdamW"][3] == "1.0000" and float(rows["AdaLomo (fused)"][3]) > 0
    assert "not run: allocates its state with .cuda()" in table  # a peer that cannot run is said, not dropped
    assert (tmp_path / "quality_val_loss.png").read_bytes()[:4] == b"\x89PNG"
    metrics = (tmp_path / "adamw" / "lr0.001-s0" / "metrics.jsonl").read_text()
    curve = [json.loads(line) for line in metrics.splitlines()]
    assert [r["step"] for r in curve if "val_loss" in r] == [0, 1, 2]
    stamp = (tmp_path / "adamw" / "lr0.001-s0" / "bench.json").read_text()
    second = subprocess.run(command, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "adamw" / "lr0.001-s0" / "bench.json").read_text() == stamp  # reused, not rerun
    assert (tmp_path / "table.md").read_text() == table
