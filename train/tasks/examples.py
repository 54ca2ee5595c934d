"""Post-training examples: JSONL records -> token sequences with a loss mask -> fixed-shape rows,
and the resumable data-parallel stream that serves them in global batches.

Every bad record is a one-line error naming `file:line` (bad JSON, a missing or mistyped field,
an unknown label, an empty response, a sequence longer than the row with task.truncate=false).
With task.truncate=true (the default) a too-long example is cut at its end and counted, and the
trainer reports the fraction of tokens cut per split - never a silent drop.

A sequence is `tokens` with `loss` (one bool per token: is this token a training target?). As a row
of S = data.seq_len positions it becomes inputs tokens[:-1] and labels tokens[1:] (-100 where the
target is not trained on), so a sequence of L tokens takes L - 1 positions; rows are right-padded
with EOS inputs and -100 labels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

IGNORE = -100  # label of a position that takes no loss (Decoder.loss's ignore_index)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a record came from, for error messages: `path:line`."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


def read_jsonl(path: str | Path) -> list[tuple[Source, dict]]:
    """(source, object) for every non-blank line of a JSONL file, each checked to be an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task data file {path} not found: set task.data / "
                                f"task.valid_data to a JSONL file (one JSON object per line) or "
                                f"task.data=stdlib")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            src = Source(str(path), lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{src}: bad JSON ({e.msg}): fix or remove the line") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{src}: expected a JSON object, got {type(obj).__name__}")
            records.append((src, obj))
    if not records:
        raise ValueError(f"{path}: no examples (the file is empty or blank): add one JSON object "
                         f"per line")
    return records


def text_field(src: Source, obj: dict, name: str, needs: str, allow_empty: bool = False) -> str:
    """obj[name] as a string; `needs` lists the fields the task reads, for the message."""
    if name not in obj:
        raise ValueError(f"{src}: missing field '{name}' ({needs})")
    value = obj[name]
    if not isinstance(value, str):
        raise ValueError(f"{src}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        what = "empty response" if name in ("response", "chosen", "rejected") else f"empty '{name}'"
        raise ValueError(f"{src}: {what}: every example needs non-empty {name} text")
    return value


def split_records(records: list, valid: list | None, fraction: float,
                  where: str) -> tuple[list, list]:
    """(train, valid): `valid` when given, else the last `fraction` of `records` (at least one)."""
    if valid is not None:
        return records, valid
    n_valid = max(1, math.floor(len(records) * fraction))
    if n_valid >= len(records):
        raise ValueError(f"{where} has {len(records)} examples: too few to hold out "
                         f"task.valid_fraction ({fraction}) of them; add examples or set "
                         f"task.valid_data")
    return records[:-n_valid], records[-n_valid:]


# --------------------------------------------------------------------------------------------
# Sequences, truncation, rows
# --------------------------------------------------------------------------------------------
@dataclass
class TokenSeq:
    """Token ids and, per token, whether it is a training target."""

    tokens: list[int]
    loss: list[bool]


@dataclass
class Truncation:
    """Tokens and examples cut to fit the row, per split (reported, never silent). An example whose
    cut leaves no trained token (its prompt fills the row) is dropped and counted here too."""

    examples: int = 0
    tokens: int = 0
    cut_examples: int = 0
    cut_tokens: int = 0
    dropped: int = 0
    first_dropped: Source | None = None

    @property
    def fraction(self) -> float:
        return self.cut_tokens / max(self.tokens, 1)

    def summary(self, split: str) -> str:
        text = (f"{split}: {self.examples} sequences, {self.cut_examples} truncated, "
                f"{self.cut_tokens}/{self.tokens} tokens cut ({100 * self.fraction:.2f}%)")
        if self.dropped:
            text += (f", {self.dropped} dropped: no response token left after the prompt (first at "
                     f"{self.first_dropped})")
        return text


def fit(seq: TokenSeq, limit: int, src: Source, truncate: bool,
        count: Truncation) -> TokenSeq | None:
    """Cut `seq` to at most `limit` tokens (keeping its start), counted in `count`; with
    truncate=False a longer sequence is an error. A cut that leaves no trained target drops the
    example (None, counted)."""
    count.examples += 1
    count.tokens += len(seq.tokens)
    if len(seq.tokens) <= limit:
        return seq
    if not truncate:
        raise ValueError(f"{src}: example is {len(seq.tokens)} tokens, longer than the {limit} "
                         f"a row of data.seq_len holds: raise data.seq_len, shorten it, or set "
                         f"task.truncate=true")
    count.cut_examples += 1
    count.cut_tokens += len(seq.tokens) - limit
    out = TokenSeq(seq.tokens[:limit], seq.loss[:limit])
    if not any(out.loss[1:]):
        count.dropped += 1
        count.first_dropped = count.first_dropped or src
        return None
    return out


def kept(items: list, where: str) -> list:
    """`items` without the dropped (None) ones; an error when nothing is left."""
    out = [x for x in items if x is not None]
    if not out:
        raise ValueError(f"{where}: every example was dropped because its prompt fills "
                         f"data.seq_len: raise data.seq_len or shorten the prompts")
    return out


def row_arrays(seqs: list[TokenSeq], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row of seq_len positions from sequences placed one after another: inputs, labels
    (-100 where no loss) and doc_ids (a document index per position, padding its own)."""
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    doc_ids = np.full(seq_len, len(seqs), dtype=np.int64)
    pos = 0
    for d, s in enumerate(seqs):
        n = len(s.tokens) - 1
        if pos + n > seq_len:
            sizes = [len(x.tokens) - 1 for x in seqs]
            raise ValueError(f"row overflow: sequences of {sizes} positions do not fit in "
                             f"{seq_len}")
        target = np.asarray(s.tokens[1:], dtype=np.int64)
        inputs[pos:pos + n] = s.tokens[:-1]
        labels[pos:pos + n] = np.where(np.asarray(s.loss[1:], dtype=bool), target, IGNORE)
        doc_ids[pos:pos + n] = d
        pos += n
    return {"tokens": inputs, "labels": labels, "doc_ids": doc_ids}


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy packing in the given order: each item (`lengths[i]` positions, <= capacity) joins
    the current row if it fits, else starts a new one. Returns the item indices of each row."""
    rows: list[list[int]] = []
    used = capacity
    for i, n in enumerate(lengths):
        if used + n > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


# --------------------------------------------------------------------------------------------
# Batches and the stream
# --------------------------------------------------------------------------------------------
class Batch(dict):
    """Named tensors with the same first dimension (rows or pairs)."""

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch({k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})

    def split(self, size: int) -> list["Batch"]:
        parts = {k: v.split(size) for k, v in self.items()}
        n = len(next(iter(parts.values())))
        return [Batch({k: parts[k][i] for k in parts}) for i in range(n)]


def stack_rows(rows: list[dict[str, Any]], weights: Sequence[float]) -> Batch:
    """A Batch from per-item arrays (stacked along a new first dim) and per-item weights."""
    out = Batch({k: torch.from_numpy(np.stack([np.asarray(r[k]) for r in rows])) for k in rows[0]})
    out["weight"] = torch.tensor(list(weights), dtype=torch.float32)
    return out


@dataclass
class ExampleStream:
    """Deterministic, resumable, data-parallel stream of global batches over `n` items, with
    PretrainData's contract: global sample j is item perm_e[j mod n] of epoch e = j // n (perm_e
    drawn from (seed, e)); data-parallel rank d keeps rows [d G/dp, (d+1) G/dp) of each global
    batch, so every dp sees the same global batches, and the state is j alone.
    `collate(indices, weights)` builds the Batch of the given items."""

    n: int
    collate: Callable[[list[int], list[float]], Batch]
    global_batch_size: int
    seed: int
    dp_rank: int = 0
    dp_size: int = 1
    name: str = "train"
    _samples: int = field(default=0, init=False)
    _perm: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False)

    def _item(self, j: int) -> int:
        epoch, i = divmod(j, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n))
        return int(self._perm[1][i])

    def _rows(self) -> range:
        per_rank = self.global_batch_size // self.dp_size
        return range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)

    def next_batch(self) -> Batch:
        """This rank's items of the next global batch."""
        j0 = self._samples
        self._samples += self.global_batch_size
        ids = [self._item(j0 + r) for r in self._rows()]
        return self.collate(ids, [1.0] * len(ids))

    def ordered_batches(self, limit: int | None = None) -> Iterator[Batch]:
        """Every item once, in order, in global batches (at most `limit`); the last batch is filled
        up with weight-0 copies of item 0, which the tasks' sums leave out."""
        n_batches = math.ceil(self.n / self.global_batch_size)
        for b in range(n_batches if limit is None else min(n_batches, limit)):
            js = [b * self.global_batch_size + r for r in self._rows()]
            ids, weights = [j if j < self.n else 0 for j in js], [float(j < self.n) for j in js]
            yield self.collate(ids, weights)

    def reset(self) -> None:
        self._samples = 0

    def state_dict(self) -> dict:
        return {"version": 1, "kind": "examples", "split": self.name, "items": self.n,
                "seed": self.seed, "samples": self._samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off (dp and the global batch size may differ)."""
        mine = self.state_dict()
        for key in ("version", "kind", "split", "items", "seed"):
            if state.get(key) != mine[key]:
                raise ValueError(f"data state {key} ({state.get(key)}) does not match this "
                                 f"run's examples ({mine[key]}): resume with the same task.data "
                                 f"and settings")
        samples = state.get("samples")
        if not isinstance(samples, int) or samples < 0:
            raise ValueError(f"data state samples ({samples!r}) must be a non-negative int")
        self._samples = samples
