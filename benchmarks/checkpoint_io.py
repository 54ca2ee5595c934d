"""What verifying data and checkpoints costs: `python benchmarks/checkpoint_io.py [--mib 256]`.

Prints one markdown table (docs/faults.md quotes it):
  * a checkpoint of --mib MiB of float32 tensors saved with train.checkpoint.save_checkpoint in one
    process: the whole save, the CRC-32 of its files (part of the save), SHA-256 and BLAKE2b of the
    same files for comparison, the verification a resume runs first (read + CRC-32 of every file),
    each as time and GB/s;
  * the token-id check TokenFile runs when it opens the embedded corpus (data.stdlib_max_bytes,
    built under --cache-dir on first use), and the same check over a --tokens-m million-token file.
Median of --repeats runs; the figures are this machine's (CPU, its disk and page cache).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import train.checkpoint as ckpt  # noqa: E402
from benchmarks import markdown_table, median_ms  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from train.data import ByteTokenizer, TokenFile, ensure_default_corpus, write_token_file  # noqa: E402


def _median_s(fn, repeats: int) -> float:
    return median_ms(fn, repeats, 0, torch.device("cpu")) / 1e3


def checkpoint_rows(mib: int, repeats: int, root: Path) -> list[tuple[str, float, float]]:
    """(what, seconds, bytes) for the save, its checksums and the verification at resume."""
    state = {f"w{i}": torch.randn(mib, 1 << 16) for i in range(4)}  # 4 x mib/4 MiB, float32
    ctx, sums, step = ParallelContext.single(), [], [0]
    gather = ckpt._gather_checksums

    def timed_gather(ctx, tmp):
        t0 = time.perf_counter()
        out = gather(ctx, tmp)
        sums.append(time.perf_counter() - t0)
        return out

    def save():
        step[0] += 1
        ckpt.save_checkpoint(root, step[0], ctx, state, {}, keep_last=1)

    ckpt._gather_checksums = timed_gather
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_save = _median_s(save, repeats)
    finally:
        ckpt._gather_checksums = gather
    path = ckpt.list_checkpoints(root)[-1]
    size = sum(p.stat().st_size for p in path.iterdir())
    t_verify = _median_s(lambda: ckpt.verify_checkpoint(path), repeats)
    files = sorted(path.iterdir())
    others = [(f"  for comparison: {name} of its files",
               _median_s(lambda: [_digest(f, algo) for f in files], repeats), size)
              for name, algo in (("SHA-256", "sha256"), ("BLAKE2b", "blake2b"))]
    return [("checkpoint save (DCP + checksums)", t_save, size),
            ("  of which CRC-32 of its files", statistics.median(sums), size), *others,
            ("verification before a resume", t_verify, size)]


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def token_rows(cache_dir: Path, max_bytes: int, tokens_m: int, repeats: int,
               root: Path) -> list[tuple[str, float, float]]:
    """(what, seconds, bytes) for the id check on the embedded corpus and on a bigger file."""
    corpus = TokenFile(ensure_default_corpus(cache_dir, ByteTokenizer(), max_bytes))
    rng = np.random.default_rng(0)
    big_prefix = root / "big"
    docs = (rng.integers(0, 257, 1_000_000) for _ in range(tokens_m))
    write_token_file(big_prefix, docs, vocab_size=257)
    big = TokenFile(big_prefix)
    return [(f"token-id check, embedded corpus ({corpus.num_tokens / 1e6:.1f} M tokens)",
             _median_s(corpus._check_ids, repeats), corpus.num_tokens * corpus.dtype.itemsize),
            (f"token-id check, {big.num_tokens / 1e6:.0f} M-token file",
             _median_s(big._check_ids, repeats), big.num_tokens * big.dtype.itemsize)]


def format_table(rows: list[tuple[str, float, float]]) -> str:
    return markdown_table(["what", "bytes", "time", "GB/s"],
                          [[what, f"{size / 2**20:.1f} MiB", f"{seconds * 1e3:.1f} ms",
                            f"{size / max(seconds, 1e-9) / 1e9:.2f}"] for what, seconds, size in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="checkpoint size in MiB (a multiple of 4)")
    p.add_argument("--tokens-m", type=int, default=100, help="million tokens in the larger token file")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is printed")
    p.add_argument("--cache-dir", default="data_cache", help="where the embedded corpus is (built)")
    p.add_argument("--stdlib-max-bytes", type=int, default=4_000_000,
                   help="embedded corpus size (configs/tiny.yaml's data.stdlib_max_bytes)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="checkpoint_io_") as tmp:
        rows = checkpoint_rows(args.mib // 4 * 4, args.repeats, Path(tmp) / "ck")
        rows += token_rows(Path(args.cache_dir), args.stdlib_max_bytes, args.tokens_m, args.repeats,
                           Path(tmp))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
