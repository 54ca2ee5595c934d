"""Tokenize text into the framework's token-file format (<PREFIX>.bin + <PREFIX>.idx).

    python launchers/preprocess.py data/books/ notes.jsonl --output data/mix --tokenizer byte

Inputs: folders (recursive: .txt/.py/.md/.jsonl), single files (one document each; .jsonl files
hold one {"text": ...} document per line) or quoted glob patterns.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script

from train.data import first_names, load_tokenizer, preprocess  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="folder, text/.jsonl file or glob pattern (quote it); several allowed")
    p.add_argument("--output", required=True, metavar="PREFIX",
                   help="output prefix: writes PREFIX.bin and PREFIX.idx (folders are created)")
    p.add_argument("--tokenizer", default="byte", metavar="byte|PATH",
                   help="'byte' (UTF-8 bytes, vocab 257) or a HuggingFace tokenizer.json / its folder")
    p.add_argument("--no-eos", action="store_true",
                   help="do not append the EOS token after each document")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return p


def main(argv=None) -> int:
    """Exit status: 0 written, 2 bad input (nothing written), 1 anything else."""
    args = build_parser().parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        stats = preprocess(args.inputs, args.output, tokenizer,
                           append_eos=not args.no_eos, progress=not args.quiet)
    except (OSError, ValueError) as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 1
    print(f"wrote {args.output}.bin/.idx: {stats.docs} docs, {stats.tokens} tokens from "
          f"{stats.files} file(s) (tokenizer {tokenizer.name}, vocab {tokenizer.vocab_size})")
    for line in report_lines(stats):
        print(f"preprocess: warning: {line}", file=sys.stderr)
    return 0


def report_lines(stats) -> list[str]:
    """One line for the inputs that gave no text, one for the bytes that were not UTF-8."""
    lines = []
    if stats.empty_files:
        lines.append(f"{len(stats.empty_files)} input file(s) had no text and were skipped: "
                     f"{first_names(stats.empty_files)}")
    if stats.undecodable:
        per_file = [f"{name} ({n})" for name, n in stats.undecodable.items()]
        lines.append(f"{sum(stats.undecodable.values())} byte(s) were not UTF-8 and became "
                     f"U+FFFD, in {len(per_file)} file(s): {first_names(per_file)}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
