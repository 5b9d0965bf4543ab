"""Built-in assets for the demo and the tests, made locally on first use (nothing is downloaded):

* ``lowmem:pydoc`` — the CPython reference documentation that ships with every Python
  (``pydoc_data.topics``), written as a JSONL text dataset, one topic per row.
* ``lowmem:tiny-llama`` — a small randomly initialized Llama (``LlamaConfig``) with a byte-level BPE
  tokenizer trained on that corpus, saved as a normal HF folder.
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
}


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
    configs = model_configs()
    if name in configs:
        return str(configs[name])
    from lowmem.errors import UserError, did_you_mean

    known = ["pydoc", *TINY_MODELS, *configs]
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


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the pydoc corpus, as a transformers fast tokenizer."""
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
    tok.train_from_iterator(pydoc_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def tiny_model(name: str = "tiny-llama", seed: int = 0) -> Path:
    """``$LOWMEM_HOME/models/NAME``: a tiny Llama and its tokenizer, saved with ``save_pretrained``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, intermediate, layers, heads, tied = TINY_MODELS[name]

    def build(target: Path) -> None:
        tokenizer = train_tokenizer(vocab)
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

    return _publish(build, home() / "models" / name)
