"""Training sequences streamed from a dataset larger than memory (``data.streaming``): rows are read lazily, shuffled
in a buffer, tokenized and packed as they are drawn; the position checkpoints and resumes exactly.

The order: a buffer of ``data.shuffle_buffer`` rows, topped up from the file before each draw; a draw takes slot
``h(seed, epoch, draw) mod len(buffer)`` (``h``: splitmix64) and moves the last slot into it. So the order depends on
the seed, the epoch and the buffer size alone, as the shuffle buffers of ``datasets`` and tf.data, and a buffer of 1
reads the file in order. At the end of the file the buffer drains by the same draws and the next epoch reads the file
again (packing carries its partial block over).

The position is small: the epoch, the rows read and the draws made in it, the row numbers in the buffer, the row
numbers drawn whose tokens are not yet in a sequence and how many of the first one's are. A resume reads the file
again up to the last of those rows (rows only, nothing tokenized) to refill them.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from itertools import islice
from pathlib import Path

from lowmem import assets
from lowmem.data import IGNORE, Example, collate, open_rows, tokenize_rows, unreadable, uses_packing
from lowmem.errors import DataError

log = logging.getLogger("lowmem")

MASK64 = (1 << 64) - 1
TOKENIZE_GROUP = 64  # rows drawn and tokenized together (the fast tokenizers batch)
FINGERPRINT_BYTES = 1 << 20


def splitmix64(x: int) -> int:
    """The splitmix64 output function: a well-mixed 64-bit integer of ``x``."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def draw_slot(seed: int, epoch: int, draw: int, size: int) -> int:
    """The buffer slot of draw number ``draw`` of ``epoch``: a function of these alone, so a resume needs no RNG."""
    return splitmix64(splitmix64(splitmix64(seed & MASK64) ^ epoch) ^ draw) % size


class StreamingBatches:
    """Micro-batches of ``batch_size`` sequences streamed from data.path; the interface of
    :class:`lowmem.data.BatchStream` (``next``, ``epoch``, ``state_dict``, ``load_state_dict``). ``part=(rank,
    nproc)``: every process reads the same stream and keeps its ``rank``-th slice of each global micro-batch of
    ``nproc × batch_size`` sequences (each reads and tokenizes the whole stream: simple and exact)."""

    def __init__(self, data_config, tokenizer, batch_size: int, seed: int, pad_id: int,
                 shuffle_buffer: int | None = None, part: tuple[int, int] = (0, 1)):
        self.data = data_config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank, self.nproc = part
        self.seed = seed
        self.pad_id = pad_id
        self.buffer_size = shuffle_buffer if shuffle_buffer is not None else data_config.shuffle_buffer
        self.packing = uses_packing(data_config)
        self.epoch = 0
        self.rows_read = 0  # of this epoch
        self.draws = 0  # of this epoch
        self._reader = None
        self._buffer: list[tuple[int, dict]] = []
        self._pending: deque[tuple[int, Example]] = deque()  # drawn, tokenized, not yet (wholly) in a sequence
        self._offset = 0  # tokens of the first pending row already in a sequence
        self._pending_tokens = 0  # tokens in _pending past _offset
        self._epoch_sequences = 0
        self._epoch_tokens = 0  # tokens drawn this epoch (a file whose rows are all empty is refused, not looped on)
        self._skipped = 0

    # -- rows ----------------------------------------------------------------------------------------

    def _rows(self, start: int):
        """(row number, row) from row ``start`` of data.path, read lazily; ``datasets``' errors become one line."""
        ds, _name = open_rows(self.data.path, self.data.split, streaming=True)
        rows = islice(enumerate(ds), start, None)
        while True:
            try:
                index, row = next(rows)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as err:  # datasets raises many types for unreadable files; all mean bad input here
                raise unreadable(self.data.path, err) from None
            yield index, dict(row)

    def _draw(self) -> tuple[int, dict] | None:
        """The next row in the shuffled order, or None when this epoch's rows are all drawn."""
        if self._reader is None:
            self._reader = self._rows(self.rows_read)
        while len(self._buffer) < self.buffer_size:
            row = next(self._reader, None)
            if row is None:
                break
            self._buffer.append(row)
            self.rows_read += 1
        if not self._buffer:
            return None
        slot = draw_slot(self.seed, self.epoch, self.draws, len(self._buffer))
        self.draws += 1
        row = self._buffer[slot]
        self._buffer[slot] = self._buffer[-1]
        self._buffer.pop()
        return row

    def _next_epoch(self) -> None:
        if self.rows_read == 0:
            raise DataError(f"data.path {self.data.path}: no rows")
        if self._epoch_sequences == 0 and not self.packing:
            raise DataError(f"data.path {self.data.path}: no row has label tokens within data.max_seq_len="
                            f"{self.data.max_seq_len}")
        if self._epoch_tokens == 0:
            raise DataError(f"data.path {self.data.path}: its rows make no tokens")
        if self._skipped:
            log.warning("data: %d rows of epoch %d have no label tokens within data.max_seq_len and were skipped",
                        self._skipped, self.epoch)
        self.epoch += 1
        self.rows_read = self.draws = self._epoch_sequences = self._epoch_tokens = self._skipped = 0
        self._reader = None

    def _fill(self) -> bool:
        """Draw and tokenize up to TOKENIZE_GROUP rows into the pending ones; False at the end of the epoch."""
        drawn = []
        while len(drawn) < TOKENIZE_GROUP:
            row = self._draw()
            if row is None:
                break
            drawn.append(row)
        if not drawn:
            return False
        self._add_pending(drawn)
        return True

    def _add_pending(self, rows: list[tuple[int, dict]]) -> None:
        examples = tokenize_rows(self.data, self.tokenizer, rows, Path(self.data.path).name)
        for (index, _row), example in zip(rows, examples):
            self._pending.append((index, example))
            self._pending_tokens += len(example.input_ids)
            self._epoch_tokens += len(example.input_ids)

    # -- sequences -----------------------------------------------------------------------------------

    def _next_sequence(self) -> Example:
        if self.packing:
            return self._next_block()
        while True:
            while not self._pending:
                if not self._fill():
                    self._next_epoch()
            _index, example = self._pending.popleft()
            self._pending_tokens -= len(example.input_ids)
            ids, labels = example.input_ids[: self.data.max_seq_len], example.labels[: self.data.max_seq_len]
            if any(t != IGNORE for t in labels[1:]):
                self._epoch_sequences += 1
                return Example(ids, labels)
            self._skipped += 1

    def _next_block(self) -> Example:
        """data.max_seq_len tokens of the drawn rows, concatenated in draw order."""
        size = self.data.max_seq_len
        while self._pending_tokens < size:
            if not self._fill():
                self._next_epoch()
        ids, labels = [], []
        while len(ids) < size:
            _index, example = self._pending[0]
            take = min(size - len(ids), len(example.input_ids) - self._offset)
            ids += example.input_ids[self._offset : self._offset + take]
            labels += example.labels[self._offset : self._offset + take]
            self._offset += take
            self._pending_tokens -= take
            if self._offset == len(example.input_ids):
                self._pending.popleft()
                self._offset = 0
        self._epoch_sequences += 1
        return Example(ids, labels)

    def next(self):
        sequences = [self._next_sequence() for _ in range(self.batch_size * self.nproc)]
        return collate(sequences[self.rank * self.batch_size:(self.rank + 1) * self.batch_size], self.pad_id)

    # -- position ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"streaming": True, "epoch": self.epoch, "rows_read": self.rows_read, "draws": self.draws,
                "buffer": [index for index, _ in self._buffer], "pending": [index for index, _ in self._pending],
                "offset": self._offset, "epoch_sequences": self._epoch_sequences, "skipped": self._skipped,
                "epoch_tokens": self._epoch_tokens}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("streaming"):
            raise DataError("resume: the checkpoint's data position is into rows held in memory, not a stream "
                            "(resume with data.streaming=false)")
        self.epoch, self.rows_read, self.draws = int(state["epoch"]), int(state["rows_read"]), int(state["draws"])
        self._epoch_sequences, self._skipped = int(state["epoch_sequences"]), int(state["skipped"])
        wanted = set(state["buffer"]) | set(state["pending"])
        rows: dict[int, dict] = {}
        if wanted:
            last = max(wanted)
            for index, row in self._rows(0):
                if index in wanted:
                    rows[index] = row
                if index >= last:
                    break
        missing = wanted - rows.keys()
        if missing:
            raise DataError(f"resume: data.path {self.data.path} has no row {min(missing)}, which the checkpoint's "
                            "position holds: the data changed (resume with the same data, or checkpoint.resume=never)")
        self._buffer = [(index, rows[index]) for index in state["buffer"]]
        self._pending.clear()
        self._pending_tokens = 0
        if state["pending"]:
            self._add_pending([(index, rows[index]) for index in state["pending"]])
        self._offset = int(state["offset"])
        self._pending_tokens -= self._offset
        self._epoch_tokens = int(state.get("epoch_tokens", 1))
        self._reader = None


def first_sequences(data_config, tokenizer, count: int) -> list[Example]:
    """The first ``count`` sequences of data.path in the file's order (PERP's calibration), streamed."""
    ordered = StreamingBatches(data_config, tokenizer, 1, 0, tokenizer.pad_token_id or 0, shuffle_buffer=1)
    return [ordered._next_sequence() for _ in range(count)]


def stream_fingerprint(path: str) -> str:
    """What a resume checks streamed data by (it is not read whole): each local file's name and size and a hash of
    its first and last MiB; a hub id by its name alone."""
    p = Path(assets.resolve(path))
    if not p.exists():
        return hashlib.blake2b(path.encode(), digest_size=16).hexdigest()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    digest = hashlib.blake2b(digest_size=16)
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(p) if f != p else f.name}:{size}".encode())
        with f.open("rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                handle.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()
