"""Token data: tokenizers, the on-disk token format, preprocessing, the default corpus, and the
resumable data-parallel sampler the trainer draws batches from.

Pipeline: text files -> `preprocess` (tokenize, append EOS) -> `<prefix>.bin` + `<prefix>.idx`
-> `TokenFile` (np.memmap, validated) -> `PretrainData` (windows of seq_len + 1 tokens, weighted
blend across files, epoch-wise shuffles, exact resume from a small state dict).

On-disk format (little-endian, no pickle anywhere):
  <prefix>.bin  all documents' token ids back to back, uint16 if vocab_size <= 65535 else uint32.
  <prefix>.idx  header `_HEADER` = magic b"MOETOK1\\0", version (u32), dtype code (u32),
                vocab_size (u64), num_docs (u64), num_tokens (u64); then num_docs + 1 int64
                offsets: doc i is bin[offsets[i]:offsets[i+1]], offsets[0] = 0 and
                offsets[-1] = num_tokens (the doc start offsets plus the end sentinel).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import struct
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol, Sequence

import numpy as np
import torch

MAGIC = b"MOETOK1\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, dtype code, vocab_size, num_docs, num_tokens
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # dtype code -> token dtype
TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_RERUN = "re-run launchers/preprocess.py to rebuild it"
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer. `name` keys cached corpora on disk."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS (vocab 257).

    Needs no files and no training, so the CPU default runs anywhere; any text round-trips.
    """

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; EOS is dropped and invalid UTF-8 becomes U+FFFD (errors="replace")."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"token id {i} is out of range for ByteTokenizer (0..256): "
                                 f"decode only ids produced by ByteTokenizer.encode")
            out.append(i)
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A HuggingFace `tokenizers` tokenizer.json (fast tokenizer), loaded lazily.

    EOS is the first of `EOS_CANDIDATES` the vocabulary contains unless `eos_token` names it.
    `name` is a hash of the file so cached corpora never mix tokenizers that share a file name.
    """

    def __init__(self, path: str, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTok  # optional dependency: import only when used

        self.path = str(path)
        self._tok = _HFTok.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(eos_token)
        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        self.name = f"hf-{digest[:12]}"

    def _find_eos(self, eos_token: str | None) -> int:
        names = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        for tok in names:
            tid = self._tok.token_to_id(tok)
            if tid is not None:
                return int(tid)
        raise ValueError(f"tokenizer {self.path} has no EOS token among {list(names)}: "
                         f"pass eos_token='<its end-of-text token>' to HFTokenizer")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids back to text; special tokens (EOS included) are dropped, like ByteTokenizer."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """"byte" -> ByteTokenizer; otherwise a tokenizer.json path (or a folder holding one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found: pass 'byte' or the path of a "
                                f"HuggingFace tokenizer.json (a folder holding one also works)")
    return HFTokenizer(str(path))


def tokenizer_for(cfg) -> ByteTokenizer | HFTokenizer:
    """The run's data.tokenizer (a TrainConfig), checked to fit its model.vocab_size."""
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {cfg.data.tokenizer!r} has {tok.vocab_size} ids but "
                         f"model.vocab_size is {cfg.model.vocab_size}: raise model.vocab_size")
    return tok


# --------------------------------------------------------------------------------------------
# Token files
# --------------------------------------------------------------------------------------------
class CorpusStats(NamedTuple):
    docs: int
    tokens: int


class PreprocessStats(NamedTuple):
    """What `preprocess` wrote and what it met on the way: input files that gave no document, and
    bytes that were not UTF-8 (each replaced by U+FFFD), per file."""

    docs: int
    tokens: int
    files: int
    empty_files: list[str]
    undecodable: dict[str, int]


class EmptyCorpusError(ValueError):
    """write_token_file(..., allow_empty=False) was given no token at all (nothing was written)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest supported dtype holding ids 0..vocab_size-1: uint16 up to 65535, else uint32."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size ({vocab_size}) must be in 1..2**32: check the tokenizer")
    return _DTYPES[1] if vocab_size <= 65535 else _DTYPES[2]


def _strip_suffix(prefix: str | os.PathLike) -> str:
    """Accept 'data/x', 'data/x.bin' or 'data/x.idx' for the same token file."""
    s = str(prefix)
    return s[:-4] if s.endswith((".bin", ".idx")) else s


def write_token_file(prefix: str | os.PathLike, docs: Iterable[Sequence[int]],
                     vocab_size: int, allow_empty: bool = True) -> CorpusStats:
    """Stream `docs` (each a sequence of token ids) into <prefix>.bin/.idx.

    Both files are written under temporary names and moved into place with os.replace (.bin
    first, .idx last), so a crash never leaves a half-written file under a final name. With
    allow_empty=False a corpus without tokens raises EmptyCorpusError and replaces nothing.
    """
    prefix = _strip_suffix(prefix)
    dtype = token_dtype(vocab_size)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = f"{prefix}.bin.tmp{os.getpid()}", f"{prefix}.idx.tmp{os.getpid()}"
    try:
        with open(tmp_bin, "wb") as f:
            offsets = _write_docs(f, docs, dtype, vocab_size)
            _flush(f)
        num_docs, num_tokens = len(offsets) - 1, int(offsets[-1])
        if num_tokens == 0 and not allow_empty:
            raise EmptyCorpusError(f"no token to write to {prefix}.bin; nothing was written")
        with open(tmp_idx, "wb") as f:
            code = 1 if dtype == _DTYPES[1] else 2
            f.write(_HEADER.pack(MAGIC, VERSION, code, vocab_size, num_docs, num_tokens))
            f.write(np.asarray(offsets, dtype="<i8").tobytes())
            _flush(f)
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        for tmp in (tmp_bin, tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)
    return CorpusStats(num_docs, num_tokens)


def _write_docs(f, docs: Iterable[Sequence[int]], dtype: np.dtype, vocab_size: int) -> list[int]:
    """Write each doc's ids as `dtype`; return the offsets [0, end_0, end_1, ...]."""
    offsets = [0]
    for d, doc in enumerate(docs):
        ids = np.asarray(doc, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"document {d} has token id {bad} outside 0..{vocab_size - 1}: "
                             f"vocab_size must match the tokenizer that produced the ids")
        f.write(ids.astype(dtype).tobytes())
        offsets.append(offsets[-1] + int(ids.size))
    return offsets


def _flush(f) -> None:
    f.flush()
    os.fsync(f.fileno())


class TokenFile:
    """A validated, memory-mapped <prefix>.bin/.idx pair.

    `tokens` is a read-only 1-D np.memmap [num_tokens]; `offsets` is int64 [num_docs + 1].
    Every inconsistency between the two files is reported with the file name on one line, and
    every token id is checked against the vocabulary when the file is opened (one vectorised pass
    over the memmap at memory speed, ~10 GB/s from the page cache: docs/faults.md), so a damaged
    .bin never reaches the embedding.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = _strip_suffix(prefix)
        self.idx_path, self.bin_path = f"{self.prefix}.idx", f"{self.prefix}.bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"token file {path} not found: run launchers/preprocess.py "
                                        f"INPUT --output {self.prefix} to create it")
        self._read_header()
        self.offsets = self._read_offsets()
        self.tokens = self._map_tokens()
        self._check_ids()

    def _read_header(self) -> None:
        with open(self.idx_path, "rb") as f:
            raw = f.read(_HEADER.size)
        if raw[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{self.idx_path}: bad magic {raw[:len(MAGIC)]!r} (expected {MAGIC!r}),"
                             f" not a token index: {_RERUN}")
        if len(raw) < _HEADER.size:
            raise ValueError(f"{self.idx_path}: truncated header ({len(raw)} of {_HEADER.size} "
                             f"bytes): {_RERUN}")
        _, version, code, self.vocab_size, self.num_docs, self.num_tokens = _HEADER.unpack(raw)
        if version != VERSION or code not in _DTYPES:
            raise ValueError(f"{self.idx_path}: unsupported version {version} / dtype code {code} "
                             f"(this code reads version {VERSION}, codes {sorted(_DTYPES)}): {_RERUN}")
        self.dtype = _DTYPES[code]

    def _read_offsets(self) -> np.ndarray:
        expected = _HEADER.size + 8 * (self.num_docs + 1)
        size = os.path.getsize(self.idx_path)
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise ValueError(f"{self.idx_path}: {what} ({size} bytes, expected {expected} for "
                             f"{self.num_docs} docs): {_RERUN}")
        offsets = np.fromfile(self.idx_path, dtype="<i8", count=self.num_docs + 1,
                              offset=_HEADER.size).astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != self.num_tokens or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{self.idx_path}: document offsets are not monotone from 0 to "
                             f"num_tokens ({self.num_tokens}): {_RERUN}")
        return offsets

    def _map_tokens(self) -> np.ndarray:
        expected = self.num_tokens * self.dtype.itemsize
        size = os.path.getsize(self.bin_path)
        if size != expected:
            raise ValueError(f"{self.bin_path}: {size} bytes but the index says {self.num_tokens} "
                             f"tokens x {self.dtype.itemsize} bytes = {expected}: {_RERUN}")
        if self.num_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    def _check_ids(self, chunk: int = 1 << 24) -> None:
        """Every id < vocab_size, checked 16M tokens at a time (bounded memory on any corpus)."""
        for lo in range(0, self.num_tokens, chunk):
            piece = self.tokens[lo:lo + chunk]
            if int(piece.max()) >= self.vocab_size:
                at = lo + int(np.argmax(piece >= self.vocab_size))
                doc = int(np.searchsorted(self.offsets, at, side="right")) - 1
                raise ValueError(f"{self.bin_path}: token {at} (document {doc}) has id "
                                 f"{int(self.tokens[at])}, outside the vocabulary "
                                 f"0..{self.vocab_size - 1} of {self.idx_path}: the file is "
                                 f"damaged or was written for another tokenizer; {_RERUN}")

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document i (a view into the memmap)."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.prefix} ({self.num_docs} docs)")
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Input specs -> file list, in order: a folder (recursive, sorted, TEXT_SUFFIXES only),
    a file (used as given), or a glob pattern (sorted matches; folders in it are expanded)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            files += _folder_files(path)
        elif path.is_file():
            files.append(path)
        elif any(c in str(spec) for c in "*?["):
            matches = sorted(glob.glob(str(spec), recursive=True))
            if not matches:
                raise FileNotFoundError(f"glob {spec} matched no files: check the pattern")
            files += expand_inputs(matches)
        else:
            raise FileNotFoundError(f"input {spec} not found: pass a folder, a text/.jsonl file "
                                    f"or a glob pattern")
    if not files:
        raise ValueError(f"no input files in {[str(s) for s in inputs]}: give at least one file")
    return files


def _folder_files(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not found:
        raise ValueError(f"folder {folder} has no {'/'.join(TEXT_SUFFIXES)} files: "
                         f"point at a folder with text files or name the files directly")
    return found


class _ProgressBar:
    """A one-line progress bar on stderr (files and bytes done), redrawn at most 10 times/s."""

    def __init__(self, n_files: int, n_bytes: int, enabled: bool, width: int = 30):
        self.n_files, self.n_bytes = n_files, max(n_bytes, 1)
        self.enabled, self.width = enabled, width
        self._last = 0.0

    def update(self, files_done: int, bytes_done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.1):
            return
        self._last = now
        fill = int(self.width * min(bytes_done / self.n_bytes, 1.0))
        bar = "#" * fill + "." * (self.width - fill)
        sys.stderr.write(f"\r[{bar}] {files_done}/{self.n_files} files "
                         f"{bytes_done / 1e6:.1f}/{self.n_bytes / 1e6:.1f} MB")
        sys.stderr.flush()

    def close(self, files_done: int, bytes_done: int) -> None:
        self.update(files_done, bytes_done, force=True)
        if self.enabled:
            sys.stderr.write("\n")


def _decode(raw: bytes, name: str, undecodable: dict[str, int]) -> str:
    """UTF-8 text; bytes that are not UTF-8 become U+FFFD and are counted in undecodable[name]."""
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text:  # a genuine U+FFFD decodes and re-encodes whole: only invalid bytes count
        bad = len(raw) - len(raw.decode("utf-8", errors="ignore").encode("utf-8"))
        if bad:
            undecodable[name] = undecodable.get(name, 0) + bad
    return text


def _iter_texts(files: Sequence[Path], on_progress: Callable[[int, int], None], empty: list[str],
                undecodable: dict[str, int]) -> Iterator[str]:
    """Yield documents: one per .jsonl line ("text" field), one per other file. Files that give
    no non-empty document are listed in `empty`; undecodable bytes are counted per file."""
    bytes_done = 0
    for n, path in enumerate(files):
        found = False
        if path.suffix == ".jsonl":
            for text, nbytes in _iter_jsonl(path, undecodable):
                bytes_done += nbytes
                on_progress(n, bytes_done)
                found = found or bool(text)
                yield text
        else:
            raw = path.read_bytes()
            bytes_done += len(raw)
            text = _decode(raw, str(path), undecodable)
            found = bool(text)
            yield text
        if not found:
            empty.append(str(path))
        on_progress(n + 1, bytes_done)


def _iter_jsonl(path: Path, undecodable: dict[str, int]) -> Iterator[tuple[str, int]]:
    """(text, bytes of the line) per non-blank line; errors name file:line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, str(path), undecodable).strip()
            if not line:
                yield "", len(raw)  # keeps byte accounting; empty docs are skipped by the caller
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg}): "
                                 f"fix or remove the line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: no string 'text' field: each line must be an "
                                 f'object like {{"text": "..."}}')
            yield obj["text"], len(raw)


def preprocess(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
               tokenizer: Tokenizer, append_eos: bool = True,
               progress: bool = True) -> PreprocessStats:
    """Tokenize `inputs` (see `expand_inputs`) into <output_prefix>.bin/.idx.

    One document per text file or per .jsonl line (blank lines and empty texts are skipped);
    with `append_eos` each document ends with tokenizer.eos_id so that windows that cross a
    document boundary see the separator. Bytes that are not UTF-8 become U+FFFD and are counted;
    inputs without text are listed; a corpus without any text is refused (nothing is written).
    """
    files = expand_inputs(inputs)
    bar = _ProgressBar(len(files), sum(p.stat().st_size for p in files), enabled=progress)
    state = {"files": 0, "bytes": 0}

    def on_progress(files_done: int, bytes_done: int) -> None:
        state["files"], state["bytes"] = files_done, bytes_done
        bar.update(files_done, bytes_done)

    eos = [tokenizer.eos_id] if append_eos else []
    empty: list[str] = []
    undecodable: dict[str, int] = {}
    texts = _iter_texts(files, on_progress, empty, undecodable)
    docs = (tokenizer.encode(t) + eos for t in texts if t)
    try:
        stats = write_token_file(output_prefix, docs, tokenizer.vocab_size, allow_empty=False)
    except EmptyCorpusError:
        raise ValueError(f"all {len(files)} input file(s) are empty ({first_names(empty)}), so "
                         f"{output_prefix} would hold no text: nothing was written; check the "
                         f"input paths") from None
    finally:
        bar.close(state["files"], state["bytes"])
    return PreprocessStats(stats.docs, stats.tokens, len(files), empty, undecodable)


def first_names(names: Sequence[str], n: int = 3) -> str:
    """The first n names, then how many more (for one-line reports)."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# --------------------------------------------------------------------------------------------
# The embedded default corpus: the Python standard library's own source
# --------------------------------------------------------------------------------------------
def default_corpus_prefix(cache_dir: str | os.PathLike, tokenizer_name: str = "byte") -> str:
    """Where the stdlib corpus for a tokenizer lives: <cache_dir>/stdlib-<tokenizer_name>."""
    return str(Path(cache_dir) / f"stdlib-{tokenizer_name}")


def stdlib_files(max_bytes: int) -> list[Path]:
    """The stdlib's .py files in sorted walk order (no site-packages, no test folders or
    test_*.py), each taken if it still fits in max_bytes (a big file is skipped, not a stop),
    so the total is <= max_bytes and the list is deterministic for a given Python install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    picked, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            if total + size <= max_bytes:
                picked.append(path)
                total += size
    if not picked:
        raise ValueError(f"no stdlib .py files under {root} fit in max_bytes ({max_bytes}): "
                         f"raise max_bytes or pass your own data path")
    return picked


def ensure_default_corpus(cache_dir: str | os.PathLike, tokenizer: Tokenizer,
                          max_bytes: int = 8_000_000) -> str:
    """Build the stdlib corpus on first use and return its prefix; later calls reuse it.

    Safe when many processes call it at once (torchrun ranks): an exclusive fcntl.flock on
    <prefix>.lock lets one process build while the others block, then find the files and reuse
    them. `max_bytes` only matters when building: an existing corpus is reused as it is.
    """
    import fcntl  # POSIX only; imported here so the rest of the module works everywhere

    prefix = default_corpus_prefix(cache_dir, tokenizer.name)
    if _usable(prefix):
        return prefix
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _usable(prefix):
                preprocess(stdlib_files(max_bytes), prefix, tokenizer, progress=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return prefix


def _usable(prefix: str) -> bool:
    """True when <prefix>.bin/.idx exist and validate (a corrupt cache is rebuilt)."""
    try:
        TokenFile(prefix)
        return True
    except (OSError, ValueError):
        return False


def resolve_data_paths(paths: Sequence[str], cache_dir: str | os.PathLike,
                       tokenizer: Tokenizer, max_bytes: int = 8_000_000) -> list[str]:
    """Map the literal "stdlib" to the (built on demand) default corpus; keep other prefixes."""
    return [ensure_default_corpus(cache_dir, tokenizer, max_bytes) if p == "stdlib" else _strip_suffix(p)
            for p in paths]


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------
def split_windows(num_tokens: int, seq_len: int, valid_fraction: float) -> dict[str, range]:
    """Window indices of each split for a file of `num_tokens` tokens.

    Window w covers tokens [w*seq_len, w*seq_len + seq_len + 1): W = (num_tokens - 1) // seq_len
    windows, stride seq_len, so inputs x = w[:-1] and targets y = w[1:] tile the file. The last
    floor(W * valid_fraction) windows are "valid", the rest "train". Adjacent windows share one
    boundary token, so the two splits never share a *target* token.
    """
    total = max(num_tokens - 1, 0) // seq_len
    n_valid = math.floor(total * valid_fraction + 1e-9)
    return {"train": range(0, total - n_valid), "valid": range(total - n_valid, total)}


class PretrainData:
    """Deterministic, resumable, data-parallel stream of [B/dp, seq_len + 1] token windows.

    Sample j of the global stream (j = 0, 1, ...):
      1. dataset d = argmax_i (w_i * (j + 1) - c_i), c_i = samples drawn from i so far (ties ->
         lowest i): Megatron's blend, which keeps every realised share within ~1 sample of w_i;
      2. its window = perm_e[c_d mod n_d], with epoch e = c_d // n_d and
         perm_e = np.random.default_rng((seed, d, e)).permutation(n_d).
    Global batch b is samples [b*B, (b+1)*B); rank r keeps rows [r*B/dp, (r+1)*B/dp), so any dp
    sees the same global batches. The counts c_i alone determine the future, so the state dict is
    just them (plus a fingerprint) and resuming costs nothing. weights=None weighs files by their
    number of windows in this split (as if the files were concatenated).
    """

    def __init__(self, prefixes: Sequence[str], weights: Sequence[float] | None, seq_len: int,
                 global_batch_size: int, seed: int, split: str, valid_fraction: float,
                 dp_rank: int = 0, dp_size: int = 1, files: Sequence[TokenFile] | None = None):
        """files: the prefixes already opened (TokenFile checks every id when it opens a file:
        the train and valid splits of one run share one opening)."""
        _check_sampler_args(prefixes, seq_len, global_batch_size, seed, split, valid_fraction,
                            dp_rank, dp_size)
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.split, self.dp_rank, self.dp_size = split, dp_rank, dp_size
        self.files = list(files) if files is not None else [TokenFile(p) for p in prefixes]
        _check_same_vocab(self.files)
        self.vocab_size = self.files[0].vocab_size
        self.windows = [self._split_of(f, valid_fraction) for f in self.files]
        self.num_windows = [len(r) for r in self.windows]
        self.weights = _normalise_weights(weights, self.num_windows, prefixes)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # dataset -> (epoch, permutation)
        self.reset()

    def _split_of(self, f: TokenFile, valid_fraction: float) -> range:
        splits = split_windows(f.num_tokens, self.seq_len, valid_fraction)
        if len(splits[self.split]) == 0:
            total, n_valid = len(splits["train"]) + len(splits["valid"]), len(splits["valid"])
            raise ValueError(f"{f.prefix}: {f.num_tokens} tokens give {total} windows of seq_len+1="
                             f"{self.seq_len + 1} tokens, {n_valid} of them validation (valid_fraction="
                             f"{valid_fraction}), so the '{self.split}' split is empty: add data, "
                             f"lower seq_len or change valid_fraction")
        return splits[self.split]

    def reset(self) -> None:
        """Back to sample 0 (call before each evaluation so validation sees the same batches)."""
        self._counts = np.zeros(len(self.files), dtype=np.int64)
        self._batches = 0

    def _next_dataset(self) -> int:
        j = int(self._counts.sum())
        d = int(np.argmax(self.weights * (j + 1) - self._counts))
        self._counts[d] += 1
        return d

    def _window(self, d: int, k: int) -> np.ndarray:
        """The k-th window drawn from dataset d, as int64 [seq_len + 1]."""
        epoch, i = divmod(k, self.num_windows[d])
        if d not in self._perms or self._perms[d][0] != epoch:
            rng = np.random.default_rng((self.seed, d, epoch))
            self._perms[d] = (epoch, rng.permutation(self.num_windows[d]))
        start = self.windows[d][int(self._perms[d][1][i])] * self.seq_len
        return np.asarray(self.files[d].tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global batch: LongTensor [B // dp_size, seq_len + 1]."""
        per_rank = self.global_batch_size // self.dp_size
        lo, hi = self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank
        rows = []
        for b in range(self.global_batch_size):
            d = self._next_dataset()  # every rank advances the blend over the whole batch
            if lo <= b < hi:
                rows.append(self._window(d, int(self._counts[d]) - 1))
        self._batches += 1
        return torch.from_numpy(np.stack(rows))  # [B/dp, seq_len + 1]

    def state_dict(self) -> dict:
        """Plain ints/lists: the position plus a fingerprint checked by load_state_dict."""
        return {"version": 1, "split": self.split, "seed": self.seed, "seq_len": self.seq_len,
                "num_windows": list(self.num_windows), "batches": self._batches,
                "samples_per_dataset": [int(c) for c in self._counts]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off (global batch size and dp may differ)."""
        mine = self.state_dict()
        for key in ("version", "split", "seed", "seq_len", "num_windows"):
            if state.get(key) != mine[key]:
                raise ValueError(f"data state {key} ({state.get(key)}) does not match this sampler "
                                 f"({mine[key]}): resume with the same data files and settings")
        counts, batches = state.get("samples_per_dataset"), state.get("batches")
        if (not isinstance(counts, list) or len(counts) != len(self.files)
                or any(not isinstance(c, int) or c < 0 for c in counts)
                or not isinstance(batches, int) or batches < 0):
            raise ValueError(f"data state samples_per_dataset ({counts}) / batches ({batches}) "
                             f"must be {len(self.files)} / 1 non-negative ints: pass a dict "
                             f"from PretrainData.state_dict")
        self._counts = np.asarray(counts, dtype=np.int64)
        self._batches = batches


def _check_sampler_args(prefixes, seq_len, global_batch_size, seed, split, valid_fraction,
                        dp_rank, dp_size) -> None:
    """One-line errors for every bad PretrainData argument, before any file is opened."""
    if isinstance(prefixes, (str, os.PathLike)) or len(prefixes) == 0:
        raise ValueError(f"prefixes ({prefixes!r}) must be a non-empty list of token-file prefixes")
    if seq_len < 1 or global_batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and global_batch_size ({global_batch_size}) "
                         f"must be >= 1")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed ({seed!r}) must be a non-negative int")
    if split not in ("train", "valid"):
        raise ValueError(f"split ({split!r}) must be 'train' or 'valid'")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction ({valid_fraction}) must be in [0, 1): e.g. 0.01")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size ({dp_size}))")
    if global_batch_size % dp_size:
        raise ValueError(f"global_batch_size ({global_batch_size}) must be divisible by dp_size "
                         f"({dp_size}): choose a multiple of {dp_size}")


def _check_same_vocab(files: Sequence[TokenFile]) -> None:
    for f in files[1:]:
        if f.vocab_size != files[0].vocab_size:
            raise ValueError(f"token files disagree on vocab_size: {files[0].prefix} "
                             f"({files[0].vocab_size}) vs {f.prefix} ({f.vocab_size}): "
                             f"preprocess all data with the same tokenizer")


def _normalise_weights(weights: Sequence[float] | None, num_windows: Sequence[int],
                       prefixes: Sequence[str]) -> np.ndarray:
    """Blend weights as float64 summing to 1 (None -> proportional to window counts)."""
    if weights is None:
        weights = num_windows
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(prefixes),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights ({list(weights)}) must be {len(prefixes)} finite non-negative "
                         f"numbers, one per data path, with a positive sum")
    return w / w.sum()
