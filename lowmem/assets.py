"""Built-in assets for the demo and the tests, made locally on first use (nothing is downloaded):

* ``lowmem:pydoc`` — the CPython reference documentation that ships with every Python
  (``pydoc_data.topics``), written as a JSONL text dataset, one topic per row.
* ``lowmem:tiny-llama`` — a small randomly initialized Llama (``LlamaConfig``) with a byte-level BPE
  tokenizer trained on that corpus, saved as a normal HF folder.
* ``lowmem:stdlib`` (the standard library's modules as text), ``lowmem:stdlib-heldout`` (held-out modules), and
  ``lowmem:stdlib-docstrings`` / ``-val`` / ``-test`` (function → docstring summary, alpaca rows), split by module
  (see :mod:`lowmem.stdlib_corpus`).
* ``lowmem:stdlib-llama`` — a small Llama pretrained here on ``lowmem:stdlib`` (about 7 minutes on 2 CPU cores, once),
  the base model of the quality benchmark and of the ``stdlib-llama-docstrings`` recipe.
* ``lowmem:llama-3.1-8b`` and the other names of :func:`model_configs` — the ``config.json`` (architecture values
  only, no weights, no tokenizer) of a common model, for ``lowmem plan``. They ship with the package.

They live under ``$LOWMEM_HOME`` (default ``~/.cache/lowmem``). Each is written to a temporary folder
and renamed into place, so an interrupted first use never leaves a broken asset behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "lowmem:"
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Used for the tiny tokenizer, and for any tokenizer without a chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    # Newlines are emitted as string literals: the renderer's trim_blocks would eat literal ones.
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
TINY_MODELS = {
    # name: (vocab, hidden, intermediate, layers, heads, tied embeddings)
    "tiny-llama": (4096, 192, 512, 4, 4, False),
    "micro-llama": (1024, 64, 128, 2, 4, False),
    "micro-llama-tied": (1024, 64, 128, 2, 4, True),
    "micro-llama-wide": (1024, 256, 512, 2, 4, False),  # rows of whole 256-value blocks (lion8bit on shards)
}

STDLIB_DATA = {  # asset name: file in $LOWMEM_HOME/v1/data/stdlib (the row sets of lowmem.stdlib_corpus.build)
    "stdlib": "corpus.jsonl", "stdlib-heldout": "corpus-heldout.jsonl", "stdlib-docstrings": "docstrings.jsonl",
    "stdlib-docstrings-val": "docstrings-val.jsonl", "stdlib-docstrings-test": "docstrings-test.jsonl",
}
STDLIB_MODEL = "tiny-llama"  # its shape (TINY_MODELS) for lowmem:stdlib-llama
STDLIB_PRETRAIN_STEPS = 1000  # of 8 × 256 tokens: 2M tokens, about a fifth of the corpus


ASSET_VERSION = 1  # bump when a built asset changes (tokenizer, template, corpus layout)


def home() -> Path:
    root = Path(os.environ.get("LOWMEM_HOME", Path.home() / ".cache" / "lowmem"))
    return root / f"v{ASSET_VERSION}"


def is_builtin(path: str) -> bool:
    return path.startswith(PREFIX)


def resolve(path: str) -> str:
    """Map ``lowmem:NAME`` to a local folder or file, creating it on first use; other paths unchanged."""
    if not is_builtin(path):
        return path
    name = path[len(PREFIX) :]
    if name == "pydoc":
        return str(pydoc_dataset())
    if name in TINY_MODELS:
        return str(tiny_model(name))
    if name in STDLIB_DATA:
        return str(stdlib_dataset() / STDLIB_DATA[name])
    if name == "stdlib-llama":
        return str(stdlib_model())
    configs = model_configs()
    if name in configs:
        return str(configs[name])
    from lowmem.errors import UserError, did_you_mean

    known = ["pydoc", *TINY_MODELS, *STDLIB_DATA, "stdlib-llama", *configs]
    raise UserError(f"'{path}' is not a built-in asset{did_you_mean(name, known)} (known: lowmem:{', lowmem:'.join(known)})")


def model_configs() -> dict[str, Path]:
    """Shipped model configs by name: package data ``lowmem/model_configs`` in an installed wheel (setup.py maps the
    checkout's ``model_configs/`` there), else ``model_configs/`` of the source checkout."""
    here = Path(__file__).resolve().parent
    folder = here / "model_configs"
    folder = folder if folder.is_dir() else here.parent / "model_configs"
    if not folder.is_dir():
        return {}
    return {p.parent.name: p.parent for p in sorted(folder.glob("*/config.json"))}


def _publish(build, dest: Path) -> Path:
    """Run ``build(tmp_path)`` and atomically rename the result to ``dest``."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        target = tmp / dest.name
        build(target)
        try:
            os.rename(target, dest)
        except OSError:
            if not dest.exists():  # another process may have published it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def pydoc_texts() -> list[str]:
    """The CPython reference topics, in a stable order."""
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def pydoc_dataset() -> Path:
    """``$LOWMEM_HOME/data/pydoc.jsonl``: one ``{"text": ...}`` row per documentation topic."""

    def build(target: Path) -> None:
        with open(target, "w") as f:
            for text in pydoc_texts():
                f.write(json.dumps({"text": text}) + "\n")

    return _publish(build, home() / "data" / "pydoc.jsonl")


def train_tokenizer(vocab_size: int, texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained on ``texts`` (default: the pydoc corpus), as a transformers fast
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else pydoc_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def tiny_model(name: str = "tiny-llama", seed: int = 0) -> Path:
    """``$LOWMEM_HOME/models/NAME``: a tiny Llama and its tokenizer, saved with ``save_pretrained``."""
    return _publish(lambda target: _write_random_llama(target, train_tokenizer(TINY_MODELS[name][0]), name, seed),
                    home() / "models" / name)


def _write_random_llama(target: Path, tokenizer, shape: str, seed: int) -> None:
    """A randomly initialized Llama of ``shape`` (TINY_MODELS) for ``tokenizer``, both saved to ``target``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, hidden, intermediate, layers, heads, tied = TINY_MODELS[shape]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def stdlib_dataset() -> Path:
    """``$LOWMEM_HOME/data/stdlib/``: the stdlib corpus and docstring task, one JSONL file per split."""
    from lowmem.stdlib_corpus import build as build_rows

    def build(target: Path) -> None:
        target.mkdir()
        for split, rows in build_rows().items():
            with open(target / f"{split}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")

    return _publish(build, home() / "data" / "stdlib")


def stdlib_model() -> Path:
    """``$LOWMEM_HOME/models/stdlib-llama``: :func:`pretrain_stdlib_model` run once; its metrics are kept beside it."""
    return _publish(lambda target: pretrain_stdlib_model(target, STDLIB_PRETRAIN_STEPS),
                    home() / "models" / "stdlib-llama")


def pretrain_stdlib_model(target: Path, steps: int, shape: str = STDLIB_MODEL) -> None:
    """A Llama of ``shape`` with a BPE tokenizer trained on ``lowmem:stdlib``, pretrained on it by lowmem's trainer
    (AdamW, lr 3e-3, cosine, ``steps`` steps of 8 × 256 tokens) and exported to ``target``, with the run's
    ``metrics.jsonl`` (held-out loss on ``lowmem:stdlib-heldout`` first and last) as ``pretrain_metrics.jsonl``."""
    import logging

    from lowmem.config import load_config
    from lowmem.trainer import train

    log = logging.getLogger("lowmem")
    log.info("building lowmem:stdlib-llama: pretraining a %s on the standard library, %d steps (once)", shape, steps)
    corpus = [json.loads(line)["text"] for line in open(stdlib_dataset() / STDLIB_DATA["stdlib"])]
    work = target.parent / "work"
    _write_random_llama(work / "init", train_tokenizer(TINY_MODELS[shape][0], corpus), shape, seed=0)
    config = load_config(None, [
        f"model.path={work / 'init'}", "data.path=lowmem:stdlib", "data.val_path=lowmem:stdlib-heldout",
        "data.max_seq_len=256", "update.strategy=standard", "update.rule=adamw", "update.lr=3e-3",
        "update.weight_decay=0.01", "train.batch_size=8", f"train.max_steps={steps}", "train.seed=0",
        "train.warmup_ratio=0.05", "train.eval_max_batches=16", f"checkpoint.output_dir={work / 'run'}",
        "checkpoint.resume=never", "log.every_n_steps=50"])
    result = train(config)
    shutil.copytree(result.final_dir, target)
    shutil.copy(work / "run" / "metrics.jsonl", target / "pretrain_metrics.jsonl")
