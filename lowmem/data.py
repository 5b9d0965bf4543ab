"""Data: text / alpaca / sharegpt / messages rows → token ids and labels (-100 = not trained on).

Rows come through the ``datasets`` library from a local .json/.jsonl/.txt/.parquet/.csv/.arrow file, a folder, or a
hub id.
Chat formats are rendered with the tokenizer's chat template (or lowmem's default when it has none);
the tokens of assistant turns are found by character offsets, so prompt masking works for any fast
tokenizer and any template whose rendering of a conversation prefix is a prefix of the full rendering.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem import assets
from lowmem.errors import DataError

log = logging.getLogger("lowmem")

IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Datasets:
    train: list[Example]
    val: list[Example]


def fingerprint(examples: list[Example]) -> str:
    """A hash of the sequences' tokens and labels, in order: equal exactly when the data a position indexes is."""
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        digest.update(array("q", [len(example.input_ids)]).tobytes())
        digest.update(array("q", example.input_ids).tobytes())
        digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Reading rows


# File types read by ``datasets``' own builders: JSON lines and text with lowmem's line-numbered errors for bad JSON;
# parquet, csv and arrow (the forms hub datasets are downloaded in) memory-mapped by ``datasets``.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv",
                 ".arrow": "arrow"}


def open_rows(path: str, split: str = "train", streaming: bool = False):
    """The ``datasets`` dataset of a local file/folder or hub dataset (an ``IterableDataset`` read lazily when
    ``streaming``), and a short name for error messages."""
    import datasets

    local = assets.resolve(path)
    p = Path(local)
    name = p.name if p.exists() else path
    try:
        if p.is_file():
            builder = FILE_BUILDERS.get(p.suffix)
            if builder is None:
                raise DataError(f"data.path {path}: unsupported file type '{p.suffix}' (use "
                                f"{', '.join(FILE_BUILDERS)})")
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", streaming=streaming)
        elif p.exists() or not (path.startswith((".", "/", "~")) or p.suffix):
            ds = datasets.load_dataset(local, split=split, streaming=streaming)  # a folder, or a hub id
        else:
            raise DataError(f"data.path {path} does not exist (a {'/'.join(FILE_BUILDERS)} file, a folder, or a hub "
                            "id)")
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable files; all mean bad input here
        raise unreadable(path, err) from None
    return ds, name


def unreadable(path: str, err: Exception) -> DataError:
    """The one-line error for a dataset ``datasets`` failed to read: the bad line of a JSON file, else its message."""
    p = Path(assets.resolve(path))
    if p.is_file() and p.suffix in (".json", ".jsonl"):
        where = json_error(p)
        if where:
            return DataError(f"data.path {path}: {where}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DataError(f"data.path {path}: could not be read as a dataset ({first})")


def read_rows(path: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a local file/folder or hub dataset, and a short name for error messages."""
    ds, name = open_rows(path, split)
    return [dict(row) for row in ds], name


def json_error(p: Path) -> str | None:
    """Where a .json/.jsonl file stops being JSON: ``line N is not valid JSON (why); fix or remove it``, or None.
    A .json file may hold one document or one object per line, as the ``datasets`` reader allows."""
    text = p.read_text(errors="replace")
    if p.suffix == ".json":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": a first line that parsed alone, so one object per line
                return f"line {err.lineno} is not valid JSON ({err.msg} at column {err.colno}); fix the file"
    # split on newlines only: str.splitlines also splits on U+2028 and others, which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number} is not valid JSON ({err.msg} at column {err.colno}); fix or remove that line"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object with fields; fix or remove that line"
    return None


# ---------------------------------------------------------------------------------------------------
# Rows → conversations


def _field(row: dict, key: str, index: int, source: str, need: str) -> object:
    value = row.get(key)
    if value is None:
        raise DataError(f"data: row {index} of {source}: field '{key}' is missing ({need})")
    return value


def _text(row: dict, key: str, index: int, source: str, need: str) -> str:
    value = _field(row, key, index, source, need)
    if not isinstance(value, str):
        raise DataError(f"data: row {index} of {source}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _turns(row: dict, key: str, index: int, source: str, need: str) -> object:
    """A chat row's list of turns; a CSV cell holds it as JSON text, which is parsed."""
    value = _field(row, key, index, source, need)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"data: row {index} of {source}: field '{key}' is text that is not JSON ({err.msg}); a "
                            "CSV cell holds the list of turns as JSON") from None
    return value


def to_messages(row: dict, fmt: str, index: int, source: str, fields=None) -> list[dict[str, str]]:
    """One row of a chat format as a list of ``{"role", "content"}`` messages; ``fields`` (``data.fields``) names the
    row's columns."""
    from lowmem.config import DataFieldsConfig

    fields = fields or DataFieldsConfig()
    if fmt == "alpaca":
        need = (f"alpaca rows need '{fields.instruction}' and '{fields.output}', optionally '{fields.input}' "
                "(data.fields.* name other columns)")
        instruction = _text(row, fields.instruction, index, source, need)
        output = _text(row, fields.output, index, source, need)
        extra = row.get(fields.input) or ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    if fmt == "sharegpt":
        need = f"sharegpt rows need '{fields.conversations}': a list of {{from, value}} (data.fields.conversations)"
        turns = _turns(row, fields.conversations, index, source, need)
        messages = []
        for j, turn in enumerate(turns if isinstance(turns, list) else []):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"data: row {index} of {source}: {fields.conversations}[{j}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise DataError(
                    f"data: row {index} of {source}: {fields.conversations}[{j}].from '{turn['from']}' is not one of "
                    f"{', '.join(SHAREGPT_ROLES)}"
                )
            messages.append({"role": role, "content": str(turn["value"])})
        return _check_conversation(messages, fields.conversations, index, source)
    if fmt == "messages":
        turns = _turns(row, fields.messages, index, source,
                       f"messages rows need '{fields.messages}': a list of {{role, content}} (data.fields.messages)")
        messages = []
        for j, turn in enumerate(turns if isinstance(turns, list) else []):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise DataError(f"data: row {index} of {source}: {fields.messages}[{j}] needs 'role' and 'content'")
            if turn["role"] not in MESSAGE_ROLES:
                raise DataError(
                    f"data: row {index} of {source}: {fields.messages}[{j}].role '{turn['role']}' is not one of "
                    f"{', '.join(MESSAGE_ROLES)}"
                )
            messages.append({"role": turn["role"], "content": str(turn["content"])})
        return _check_conversation(messages, fields.messages, index, source)
    raise ValueError(f"not a chat format: {fmt}")


def _check_conversation(messages: list[dict], key: str, index: int, source: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"data: row {index} of {source}: field '{key}' has no assistant turn to train on")
    return messages


# ---------------------------------------------------------------------------------------------------
# Tokenizing


def tokenize_text(texts: list[str], tokenizer) -> list[Example]:
    """Each document gets the tokenizer's special tokens and ends with EOS; every token is a label."""
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    examples = []
    for ids in encoded:
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = [*ids, tokenizer.eos_token_id]
        examples.append(Example(ids, list(ids)))
    return examples


def chat_template(tokenizer) -> str:
    return tokenizer.chat_template or assets.DEFAULT_CHAT_TEMPLATE


def tokenize_chat(conversations: list[list[dict]], tokenizer, mask_prompt: bool = True) -> list[Example]:
    """Render with the chat template; with ``mask_prompt`` only assistant turns are labels."""
    template = chat_template(tokenizer)

    def render(messages, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    texts, spans = [], []
    for messages in conversations:
        full = render(messages)
        ranges = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = render(messages[:i], generation_prompt=True) if i else render([], generation_prompt=True)
            upto = render(messages[: i + 1])
            if not full.startswith(upto) or not upto.startswith(prefix):
                raise DataError(
                    "data: the tokenizer's chat template does not render conversations prefix-consistently, "
                    "so assistant tokens cannot be located (set data.mask_prompt=false)"
                )
            ranges.append((len(prefix), len(upto)))
        texts.append(full)
        spans.append(ranges)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    examples = []
    for ids, offsets, ranges in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
        if mask_prompt:
            labels = [
                tok if any(lo <= start < hi for lo, hi in ranges) else IGNORE
                for tok, (start, _end) in zip(ids, offsets)
            ]
        else:
            labels = list(ids)
        examples.append(Example(list(ids), labels))
    return examples


def pack(examples: list[Example], block_size: int, keep_short: bool = False) -> list[Example]:
    """Concatenate examples and cut fixed-length blocks; the last partial block is dropped, unless ``keep_short``
    and there would be no block at all (then the whole, shorter, sequence is one)."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    n_blocks = len(ids) // block_size
    if n_blocks == 0 and keep_short and sum(t != IGNORE for t in labels[1:]) > 0:
        return [Example(ids, labels)]
    return [
        Example(ids[i * block_size : (i + 1) * block_size], labels[i * block_size : (i + 1) * block_size])
        for i in range(n_blocks)
    ]


def truncate(examples: list[Example], max_len: int) -> list[Example]:
    """Cut each example to ``max_len`` tokens; drop those left with nothing to learn."""
    kept = [Example(e.input_ids[:max_len], e.labels[:max_len]) for e in examples]
    kept = [e for e in kept if any(t != IGNORE for t in e.labels[1:])]
    if len(kept) < len(examples):
        log.warning("data: %d examples have no label tokens within data.max_seq_len and are skipped",
                    len(examples) - len(kept))
    return kept


def uses_packing(data_config) -> bool:
    """data.packing as used: null packs text and not the chat formats."""
    return data_config.packing if data_config.packing is not None else data_config.format == "text"


def tokenize_rows(data_config, tokenizer, chosen: list[tuple[int, dict]], where: str) -> list[Example]:
    """(row number, row) pairs → one example per row, tokenized by data.format (whole: not packed or truncated)."""
    if data_config.format == "text":
        key = data_config.text_field
        need = f"text rows need '{key}' (set data.text_field)"
        return tokenize_text([_text(row, key, i, where, need) for i, row in chosen], tokenizer)
    conversations = [to_messages(row, data_config.format, i, where, data_config.fields) for i, row in chosen]
    return tokenize_chat(conversations, tokenizer, data_config.mask_prompt)


def encode_rows(data_config, tokenizer, chosen: list[tuple[int, dict]], where: str, keep_short: bool = False,
                packing: bool | None = None) -> list[Example]:
    """(row number, row) pairs → examples: tokenized by data.format, then packed (``packing``, default
    :func:`uses_packing`) or truncated to data.max_seq_len; ``keep_short`` as :func:`pack`."""
    if not chosen:
        return []
    examples = tokenize_rows(data_config, tokenizer, chosen, where)
    if packing is None:
        packing = uses_packing(data_config)
    if packing:
        return pack(examples, data_config.max_seq_len, keep_short)
    return truncate(examples, data_config.max_seq_len)


def build_datasets(data_config, tokenizer, seed: int) -> Datasets:
    """Read, split (by row, before tokenizing, so no document is in both; or data.val_path's rows), tokenize, pack.
    Under data.streaming only the validation rows (data.val_path) are read: the training rows are streamed by
    :class:`lowmem.data_stream.StreamingBatches`, and ``train`` is empty."""
    if data_config.streaming:
        train_rows, source, n_val = [], data_config.path, 0
    else:
        rows, source = read_rows(data_config.path, data_config.split)
        if not rows:
            raise DataError(f"data.path {data_config.path}: no rows")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = 0
        fraction = data_config.held_out_fraction()
        if fraction > 0 and len(rows) > 1:
            n_val = max(1, round(fraction * len(rows)))
        # (row number in its file, row): errors name the row as the file has it
        val_rows = [(i, rows[i]) for i in sorted(order[:n_val])]
        train_rows = [(i, rows[i]) for i in sorted(order[n_val:])]
    val_source = source
    if data_config.val_path:
        held_out, val_source = read_rows(data_config.val_path, "validation")
        val_rows, n_val = list(enumerate(held_out)), len(held_out)
        if not val_rows:
            raise DataError(f"data.val_path {data_config.val_path}: no rows")
    elif data_config.streaming:
        val_rows = []

    # validation rows shorter than one block together still make one (shorter) sequence: asked for, it happens
    result = Datasets(train=encode_rows(data_config, tokenizer, train_rows, source),
                      val=encode_rows(data_config, tokenizer, val_rows, val_source, keep_short=True))
    if n_val and not result.val:
        log.warning("data: the %d validation rows have no label tokens: no validation", n_val)
    log.info("data: %s (%s): %s train and %d validation sequences of up to %d tokens%s", data_config.path,
             data_config.format, "streamed" if data_config.streaming else len(result.train), len(result.val),
             data_config.max_seq_len, ", packed" if uses_packing(data_config) else "")
    return result


# ---------------------------------------------------------------------------------------------------
# Batching


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class BatchStream:
    """Micro-batches in a seeded order, reshuffled each epoch; its position checkpoints and resumes.

    The order depends only on the seed and the epoch, never on the batch size, so batch 4 and 2×2
    accumulation see the same examples. ``part=(rank, nproc)``: the global micro-batch is ``nproc × batch_size``
    sequences and this process gets its ``rank``-th slice, so 2 processes of batch 2 see what one of batch 4 sees.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int,
                 part: tuple[int, int] = (0, 1)):
        self.rank, nproc = part
        if len(examples) < batch_size * nproc:
            raise DataError(
                f"data: only {len(examples)} training sequences, fewer than train.batch_size={batch_size}"
                + (f" × {nproc} processes" if nproc > 1 else "")
            )
        self.examples = examples
        self.local_batch_size = batch_size
        self.batch_size = batch_size * nproc
        self.seed = seed
        self.pad_id = pad_id
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def next(self) -> dict[str, torch.Tensor]:
        if self.position + self.batch_size > len(self.examples):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        mine = self.position + self.rank * self.local_batch_size
        picked = [self.examples[i] for i in self._order[mine : mine + self.local_batch_size]]
        self.position += self.batch_size
        return collate(picked, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, max_batches: int | None = None,
                 part: tuple[int, int] = (0, 1)):
    """The validation set in order, in batches. ``part=(rank, nproc)``: batches of ``nproc × batch_size`` examples
    (``max_batches`` of them at most), of which this rank takes its ``batch_size``, so N processes evaluate what one
    process with their global batch does, each an N-th of it. Every rank yields as many batches (a forward of a
    sharded model is a collective): a rank whose share of the last batch is empty gets one example with no label
    counted."""
    rank, nproc = part
    step = batch_size * nproc
    for count, i in enumerate(range(0, len(examples), step)):
        if max_batches is not None and count >= max_batches:
            return
        mine = examples[i + rank * batch_size : i + (rank + 1) * batch_size]
        if mine:
            yield collate(mine, pad_id)
        else:
            batch = collate(examples[i : i + 1], pad_id)
            batch["labels"].fill_(IGNORE)
            yield batch
