"""The lowmem command as a user runs it: train from a shipped recipe, eval, ls, cp, env, --help."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from float_error import SUM64
from lowmem.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_train_shipped_recipe_by_name_then_eval(tmp_path, micro_model_path, text_data):
    out = tmp_path / "out"
    result = run("train", "tiny-llama-pydoc", f"model.path={micro_model_path}", f"data.path={text_data}",
                 "data.max_seq_len=32", "train.max_steps=3", "train.eval_every_n_steps=null",
                 "checkpoint.save_every_n_steps=null", f"checkpoint.output_dir={out}", "log.progress=false")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["val_ppl_after"] < summary["val_ppl_before"]
    # float64, so that the chunked loss below is the plain one up to float64 sums in another order (float_error.py)
    args = ("eval", str(out / "final"), "--data", text_data, "--max-seq-len", "32", "--max-batches", "2", "--dtype",
            "float64")
    result = run(*args)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["perplexity"] == math.exp(scores["loss"]) and scores["tokens"] > 0
    chunked = run(*args, "--loss-chunk-tokens", "5")
    assert chunked.exit_code == 0, chunked.output
    assert json.loads(chunked.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(scores["loss"], rel=SUM64)


def test_eval_rejects_bad_data_with_one_line(tmp_path, micro_model_path):
    result = run("eval", micro_model_path, "--data", str(tmp_path / "missing.jsonl"))
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_ls_and_cp(tmp_path):
    listing = run("ls")
    assert listing.exit_code == 0 and "tiny-llama-pydoc" in listing.output
    copied = run("cp", "tiny-llama-pydoc", str(tmp_path))
    assert copied.exit_code == 0 and (tmp_path / "tiny-llama-pydoc.yaml").exists()
    again = run("cp", "tiny-llama-pydoc", str(tmp_path))
    assert again.exit_code == 2 and "--force" in again.stderr
    typo = run("cp", "tiny-lama-pydoc", str(tmp_path))
    assert typo.exit_code == 2 and "did you mean 'tiny-llama-pydoc'" in typo.stderr


def test_env_reports_the_extension():
    result = run("env")
    assert result.exit_code == 0
    assert "torch" in result.output and "native ops" in result.output and "prebuilt" in result.output


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["ls"], ["cp"], ["env"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0 and "Usage" in result.output


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lowmem"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


def test_a_wheel_install_lists_and_copies_the_recipes_and_ships_the_model_configs(tmp_path):
    # built from a copy of the tree (no build files left in the checkout), without the extension, and unpacked as
    # pip installs it; run from elsewhere, so the checkout's recipes/ cannot be found
    import shutil
    import zipfile

    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    shutil.copytree(root / "lowmem", source / "lowmem", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copytree(root / "recipes", source / "recipes")
    shutil.copytree(root / "model_configs", source / "model_configs")
    env = {**os.environ, "LOWMEM_SKIP_BUILD": "1"}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, env=env)
    assert built.returncode == 0, built.stderr
    site = tmp_path / "site"
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("lowmem-*.whl"))) as wheel:
        wheel.extractall(site)
    shipped = sorted(p.name for p in (root / "recipes").glob("*.yaml"))
    assert sorted(p.name for p in (site / "lowmem" / "recipes").glob("*.yaml")) == shipped
    cli = "import sys, lowmem; assert lowmem.__file__.startswith(sys.argv[1]); from lowmem.cli import main; main(sys.argv[2:])"
    work = tmp_path / "elsewhere"
    work.mkdir()

    def lowmem(*args):
        return subprocess.run([sys.executable, "-P", "-c", cli, str(site), *args], capture_output=True, text=True,
                              cwd=work, env={**env, "PYTHONPATH": str(site)})

    listing = lowmem("ls")
    assert listing.returncode == 0 and all(name.removesuffix(".yaml") in listing.stdout for name in shipped), listing
    configs = sorted(p.name for p in (root / "model_configs").iterdir())
    assert sorted(p.parent.name for p in (site / "lowmem" / "model_configs").glob("*/config.json")) == configs
    assert "llama-3.1-8b" in listing.stdout
    copied = lowmem("cp", "tiny-llama-pydoc", str(work))
    assert copied.returncode == 0 and (work / "tiny-llama-pydoc.yaml").read_text() == (
        root / "recipes" / "tiny-llama-pydoc.yaml").read_text()
