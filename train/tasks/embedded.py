"""Embedded post-training datasets made from the Python standard library's docstrings (no
download; the same material as the embedded pretraining corpus), written once per machine as
JSONL under data.cache_dir/tasks/ and then read like any user file.

Every documented function and class of the stdlib (train.data.stdlib_files) gives a record: its
dotted name and the first paragraph of its docstring (10-200 characters, whitespace collapsed).
Shuffled with a fixed seed, so the held-out tail of each file is a random sample.
    classify  text = the docstring, label = the topic of its package (files, network, concurrency,
              text), the four classes cut to the same size: chance is 25%
    sft       messages: the user asks what `name` does, the assistant answers with the docstring
              (rendered by the chat template)
    dpo       prompt = "name:\\n", chosen = the docstring, rejected = its words shuffled
The files depend only on the Python installation, so every rank and every run builds the same.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data import stdlib_files

VERSION = 1
SEED = 20260101
TOPICS = {  # topic -> the stdlib packages whose docstrings it takes
    "files": ("os pathlib shutil glob fnmatch tempfile filecmp fileinput zipfile tarfile gzip bz2 "
              "lzma posixpath ntpath genericpath stat io _pyio zipimport _compression dbm shelve"),
    "network": ("socket ssl http urllib smtplib ftplib poplib imaplib email xmlrpc socketserver "
                "ipaddress mailbox wsgiref nntplib mimetypes"),
    "concurrency": ("threading multiprocessing asyncio concurrent queue sched subprocess signal "
                    "selectors _threading_local contextvars"),
    "text": ("re string textwrap difflib codecs encodings html gettext locale stringprep tokenize "
             "shlex csv json xml configparser tomllib plistlib base64 quopri pprint reprlib "
             "sre_parse sre_compile _markupbase"),
}


def docstrings(max_bytes: int = 10**9) -> Iterator[tuple[str, str, str]]:
    """(top-level package, dotted name, first docstring paragraph) per documented function or
    class, in stdlib file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files(max_bytes):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        yield from _documented(tree, module)


def _documented(tree: ast.AST, module: str, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    for node in getattr(tree, "body", []):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        name = f"{prefix}{node.name}"
        doc = ast.get_docstring(node)
        if doc:
            first = " ".join(doc.strip().split("\n\n")[0].split())
            if 10 <= len(first) <= 200:
                yield module.split(".")[0], f"{module}.{name}", first
        if isinstance(node, ast.ClassDef):
            yield from _documented(node, module, f"{name}.")


def classify_records(rng: np.random.Generator) -> list[dict]:
    topic_of = {pkg: topic for topic, pkgs in TOPICS.items() for pkg in pkgs.split()}
    by_topic: dict[str, list[str]] = {t: [] for t in TOPICS}
    for pkg, _, doc in docstrings():
        if pkg in topic_of:
            by_topic[topic_of[pkg]].append(doc)
    n = min(len(v) for v in by_topic.values())
    records = [{"text": doc, "label": t} for t, docs in by_topic.items()
               for doc in (docs[k] for k in sorted(rng.permutation(len(docs))[:n]))]
    return [records[k] for k in rng.permutation(len(records))]


def sft_records(rng: np.random.Generator, limit: int = 4000) -> list[dict]:
    rows = [{"messages": [{"role": "user", "content": f"What does {name} do?"},
                          {"role": "assistant", "content": doc}]} for _, name, doc in docstrings()]
    return [rows[k] for k in rng.permutation(len(rows))[:limit]]


def dpo_records(rng: np.random.Generator, limit: int = 4000) -> list[dict]:
    rows = []
    for _, name, doc in docstrings():
        words = doc.split()
        if len(set(words)) < 4:
            continue
        shuffled = list(words)
        while shuffled == words:
            shuffled = [words[k] for k in rng.permutation(len(words))]
        rows.append({"prompt": f"{name}:\n", "chosen": doc, "rejected": " ".join(shuffled)})
    return [rows[k] for k in rng.permutation(len(rows))[:limit]]


BUILDERS = {"classify": classify_records, "sft": sft_records, "dpo": dpo_records}


def embedded_dataset(kind: str, cache_dir: str | os.PathLike) -> str:
    """The JSONL file of the embedded `kind` dataset, built on first use (a file lock lets one
    process build while the others wait; the file appears under its final name complete)."""
    import fcntl  # POSIX only, as the pretraining corpus's lock

    path = Path(cache_dir) / "tasks" / f"stdlib-{kind}-v{VERSION}.jsonl"
    if path.is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                records = BUILDERS[kind](np.random.default_rng(SEED))
                tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(path)
