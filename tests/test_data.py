"""Spec tests for train/data.py and launchers/preprocess.py.

Sampler tests use token files whose ids equal their positions (plus a per-file base), so every
window names the file and offset it came from and can be checked against independent arithmetic.
"""

import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launchers import preprocess as preprocess_cli
from train.data import (ByteTokenizer, HFTokenizer, PretrainData, TokenFile,
                        default_corpus_prefix, ensure_default_corpus, load_tokenizer, preprocess,
                        resolve_data_paths, split_windows, stdlib_files, write_token_file)

REPO = Path(__file__).resolve().parents[1]
BYTE = ByteTokenizer()
VOCAB = 200_000  # > 65535: uint32, so ids can equal positions
BASES = (0, 100_000, 150_000)  # token id = base of the file + position in the file


# ------------------------------------------------------------------------------ tokenizers
def test_byte_tokenizer_round_trip():
    text = "plain ASCII, ümlauts, 漢字 and 🙂\n"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids + [BYTE.eos_id]) == text  # EOS is dropped
    assert (BYTE.vocab_size, BYTE.eos_id) == (257, 256)
    assert BYTE.decode([0xFF, 104, 105]) == "\ufffdhi"  # invalid UTF-8 -> replacement char
    with pytest.raises(ValueError, match="out of range"):
        BYTE.decode([300])


def _word_tokenizer(tmp_path, specials=("[UNK]", "</s>")):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(specials))
    tok.train_from_iterator(["the cat sat", "the dog ran", "a cat ran"], trainer)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    tok.save(str(path))
    return tok, path


def test_hf_tokenizer(tmp_path):
    ref, path = _word_tokenizer(tmp_path)
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == ref.token_to_id("</s>")
    assert tok.vocab_size == 8  # 2 specials + the, cat, sat, dog, ran, a
    ids = tok.encode("the dog sat")
    assert ids == [ref.token_to_id(w) for w in ("the", "dog", "sat")]
    assert tok.decode(ids + [tok.eos_id]) == "the dog sat"
    assert load_tokenizer(str(path.parent)).name == tok.name  # a folder holding tokenizer.json
    # A corpus through the HF tokenizer round-trips like the byte one.
    (tmp_path / "a.txt").write_text("a cat sat")
    stats = preprocess([tmp_path / "a.txt"], tmp_path / "hf", tok, progress=False)
    assert stats[:2] == (1, 4)
    assert TokenFile(tmp_path / "hf").doc(0).tolist() == tok.encode("a cat sat") + [tok.eos_id]


def test_hf_tokenizer_without_eos_and_missing_file(tmp_path):
    ref, path = _word_tokenizer(tmp_path, specials=("[UNK]",))
    with pytest.raises(ValueError, match=r"no EOS token.*eos_token="):
        HFTokenizer(str(path))
    assert HFTokenizer(str(path), eos_token="cat").eos_id == ref.token_to_id("cat")
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*byte"):
        load_tokenizer(str(missing))


# ------------------------------------------------------------------------------ token files
def _write_corpus(root: Path) -> dict:
    """A folder with .txt, .md, nested .jsonl and an ignored .csv; returns {name: text}."""
    texts = {"a.txt": "first file\nwith two lines\n", "c.md": "# title ü\n"}
    (root / "sub").mkdir(parents=True)
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "ignored.csv").write_text("x,y\n")
    lines = ["jsonl doc one", "doc two 🙂"]
    (root / "sub" / "b.jsonl").write_text(
        json.dumps({"text": lines[0]}) + "\n\n" + json.dumps({"text": lines[1], "id": 7}) + "\n")
    return {"texts": [texts["a.txt"], texts["c.md"], *lines]}  # sorted path order


def test_preprocess_round_trip(tmp_path):
    corpus = _write_corpus(tmp_path / "in")
    stats = preprocess([tmp_path / "in"], tmp_path / "out" / "mix", BYTE, progress=False)
    expected = [BYTE.encode(t) + [BYTE.eos_id] for t in corpus["texts"]]
    tf = TokenFile(tmp_path / "out" / "mix")
    assert [tf.doc(i).tolist() for i in range(len(tf))] == expected
    assert stats[:2] == (4, sum(map(len, expected))) == (tf.num_docs, tf.num_tokens)
    assert tf.dtype == np.uint16 and tf.vocab_size == 257
    assert os.path.getsize(tmp_path / "out" / "mix.bin") == 2 * tf.num_tokens
    # A glob and --no-eos through the CLI's main(): same docs without the EOS.
    rc = preprocess_cli.main([str(tmp_path / "in" / "**" / "*.jsonl"), "--output",
                              str(tmp_path / "j"), "--no-eos", "--quiet"])
    assert rc == 0
    tf = TokenFile(tmp_path / "j")
    assert [tf.doc(i).tolist() for i in range(len(tf))] == [BYTE.encode(t) for t in corpus["texts"][2:]]


def test_preprocess_progress_bar(tmp_path, capsys):
    _write_corpus(tmp_path / "in")
    preprocess([tmp_path / "in"], tmp_path / "o", BYTE, progress=True)
    err = capsys.readouterr().err
    assert "3/3 files" in err and "#" * 30 in err


def test_uint32_for_large_vocab(tmp_path):
    docs = [[0, 65535, 65536, 69999], [12345]]
    write_token_file(tmp_path / "big", docs, vocab_size=70_000)
    tf = TokenFile(tmp_path / "big")
    assert tf.dtype == np.uint32 and os.path.getsize(tmp_path / "big.bin") == 4 * 5
    assert [tf.doc(0).tolist(), tf.doc(1).tolist()] == docs
    write_token_file(tmp_path / "small", docs[1:], vocab_size=65_535)
    assert TokenFile(tmp_path / "small").dtype == np.uint16
    with pytest.raises(ValueError, match="document 0 has token id 70000"):
        write_token_file(tmp_path / "bad", [[70_000]], vocab_size=70_000)


def _corrupt(prefix: Path, kind: str) -> None:
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    raw = bytearray(idx.read_bytes())
    if kind == "magic":
        raw[:8] = b"NOTTOKEN"
    elif kind == "idx_truncated":
        raw = raw[:-5]
    elif kind == "idx_header_truncated":
        raw = raw[:20]
    elif kind == "offsets":  # swap the two middle offsets
        a, b = raw[-16:-8], raw[-24:-16]
        raw[-24:-16], raw[-16:-8] = a, b
    elif kind == "bin_truncated":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif kind == "bin_missing":
        bin_.unlink()
    idx.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,file,pattern", [
    ("magic", "idx", "bad magic"), ("idx_truncated", "idx", "truncated"),
    ("idx_header_truncated", "idx", "truncated header"), ("offsets", "idx", "not monotone"),
    ("bin_truncated", "bin", "bytes but the index says"), ("bin_missing", "bin", "not found"),
])
def test_corrupt_token_files_give_clear_errors(tmp_path, kind, file, pattern):
    prefix = tmp_path / "c"
    write_token_file(prefix, [[1, 2, 3], [4, 5], [6]], vocab_size=257)
    TokenFile(prefix)  # valid before the damage
    _corrupt(prefix, kind)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        TokenFile(prefix)
    msg = str(info.value)
    assert pattern in msg and f"c.{file}" in msg and "preprocess.py" in msg and "\n" not in msg


def test_write_is_atomic(tmp_path):
    prefix = tmp_path / "atomic"
    write_token_file(prefix, [[1, 2, 3]], vocab_size=257)

    def failing_docs():
        yield [7, 7]
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash"):
        write_token_file(prefix, failing_docs(), vocab_size=257)
    assert TokenFile(prefix).doc(0).tolist() == [1, 2, 3]  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.bin", "atomic.idx"]  # no temps


@pytest.mark.parametrize("content,line,pattern", [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', 3, "bad JSON"),
    ('{"text": "ok"}\n{"body": "no text"}\n', 2, "no string 'text' field"),
    ('{"text": 5}\n', 1, "no string 'text' field"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, pattern):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(ValueError, match=f"d.jsonl:{line}: {pattern}"):
        preprocess([tmp_path / "d.jsonl"], tmp_path / "o", BYTE, progress=False)
    assert not list(tmp_path.glob("o.*"))  # nothing left behind


def test_preprocess_reports_empty_inputs_and_undecodable_bytes(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    text = "caf\u00e9 ok \ufffd".encode() + b"\xff\xfe tail"  # a real U+FFFD, then 2 bad bytes
    (tmp_path / "in" / "a.txt").write_bytes(text)
    (tmp_path / "in" / "b.txt").write_bytes(b"")
    (tmp_path / "in" / "c.jsonl").write_text('{"text": ""}\n\n')
    (tmp_path / "in" / "d.txt").write_text("fine")
    stats = preprocess([tmp_path / "in"], tmp_path / "o", BYTE, progress=False)
    assert stats.docs == 2 and stats.files == 4
    assert [Path(f).name for f in stats.empty_files] == ["b.txt", "c.jsonl"]
    assert {Path(k).name: v for k, v in stats.undecodable.items()} == {"a.txt": 2}
    assert preprocess_cli.main([str(tmp_path / "in"), "--output", str(tmp_path / "o2"),
                                "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("preprocess: warning: 2 input file(s) had no text and were skipped: ")
    assert err[1].startswith("preprocess: warning: 2 byte(s) were not UTF-8 and became U+FFFD, "
                             "in 1 file(s): ")


def test_preprocess_refuses_an_empty_corpus_and_keeps_the_old_output(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("")
    (tmp_path / "in" / "b.jsonl").write_text("\n")
    write_token_file(tmp_path / "o", [[1, 2, 3]], vocab_size=257)
    before = (tmp_path / "o.bin").read_bytes()
    with pytest.raises(ValueError, match=r"all 2 input file\(s\) are empty .*a.txt.*nothing was"):
        preprocess([tmp_path / "in"], tmp_path / "o", BYTE, progress=False)
    assert (tmp_path / "o.bin").read_bytes() == before and TokenFile(tmp_path / "o").num_tokens == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.bin", "o.idx"]  # no temp files
    assert preprocess_cli.main([str(tmp_path / "in"), "--output", str(tmp_path / "o"),
                                "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_token_ids_are_checked_against_the_vocabulary_when_opened(tmp_path):
    write_token_file(tmp_path / "t", [[1, 2, 3], [4, 5, 6, 7]], vocab_size=257)
    data = bytearray((tmp_path / "t.bin").read_bytes())
    data[10:12] = (300).to_bytes(2, "little")  # token 5 (document 1) -> id 300
    (tmp_path / "t.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"t.bin: token 5 \(document 1\) has id 300, outside the "
                                         r"vocabulary 0..256") as info:
        TokenFile(tmp_path / "t")
    assert "\n" not in str(info.value)


def test_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="input .*nope not found"):
        preprocess([tmp_path / "nope"], tmp_path / "o", BYTE, progress=False)
    with pytest.raises(FileNotFoundError, match="matched no files"):
        preprocess([str(tmp_path / "*.txt")], tmp_path / "o", BYTE, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt"):
        preprocess([tmp_path / "empty"], tmp_path / "o", BYTE, progress=False)
    assert preprocess_cli.main([str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2


# ------------------------------------------------------------------------------ sampler
@pytest.fixture
def files(tmp_path):
    """Three files of 1000, 400 and 250 tokens whose ids are base + position."""
    prefixes = []
    for n, (base, size) in enumerate(zip(BASES, (1000, 400, 250))):
        prefix = tmp_path / f"f{n}"
        half = size // 2  # two docs, so windows cross a document boundary
        write_token_file(prefix, [base + np.arange(half), base + np.arange(half, size)], VOCAB)
        prefixes.append(str(prefix))
    return prefixes


def _origin(row: torch.Tensor) -> tuple[int, int]:
    """(file index, start position) of a window, checking it is consecutive ids."""
    first = int(row[0])
    f = max(i for i, b in enumerate(BASES) if first >= b)
    assert torch.equal(row, torch.arange(first, first + len(row))), "window is not contiguous"
    return f, first - BASES[f]


def _make(files, **kw):
    args = dict(prefixes=files, weights=None, seq_len=8, global_batch_size=8, seed=0,
                split="train", valid_fraction=0.1)
    args.update(kw)
    return PretrainData(**args)


def test_batches_are_windows_and_epochs_cover_all(files):
    data = _make(files[:1], global_batch_size=4)
    n_train = len(split_windows(1000, 8, 0.1)["train"])  # (999 // 8) = 124 windows, 12 valid
    assert n_train == 112
    starts = []
    for _ in range(n_train // 4):  # exactly one epoch
        batch = data.next_batch()
        assert batch.dtype == torch.int64 and batch.shape == (4, 9)
        starts += [_origin(row)[1] for row in batch]
    assert sorted(starts) == [8 * w for w in range(n_train)]  # every window once, stride 8
    assert starts != sorted(starts)  # shuffled


def test_determinism_and_seed(files):
    a, b, c = _make(files), _make(files), _make(files, seed=1)
    batches_a = [a.next_batch() for _ in range(5)]
    assert all(torch.equal(x, b.next_batch()) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()) for x in batches_a)


def _reference_stream(num_windows, weights, seed, n):
    """The spec, written out directly: blend argmax of lag, then epoch-wise permutations."""
    w = np.asarray(weights, dtype=float) / sum(weights)
    counts, out = [0] * len(w), []
    for j in range(n):
        d = max(range(len(w)), key=lambda i: (w[i] * (j + 1) - counts[i], -i))
        epoch, k = divmod(counts[d], num_windows[d])
        out.append((d, int(np.random.default_rng((seed, d, epoch)).permutation(num_windows[d])[k])))
        counts[d] += 1
    return out


def test_stream_matches_reference_spec(files):
    data = _make(files, weights=[2, 1, 1], seed=3)
    got = [_origin(row) for _ in range(40) for row in data.next_batch()]  # 320 samples: > 1 epoch of f2
    ref = _reference_stream(data.num_windows, [2, 1, 1], 3, 320)
    assert got == [(d, 8 * w) for d, w in ref]


def test_blend_proportions(files):
    weights = [0.5, 0.3, 0.2]
    data = _make(files, weights=weights, global_batch_size=10)
    seen = np.zeros(3)
    for _ in range(100):
        for row in data.next_batch():
            seen[_origin(row)[0]] += 1
    assert np.all(np.abs(seen - 1000 * np.asarray(weights)) <= 1)
    # weights=None weighs by window count: 112, 45 and 28 train windows
    data = _make(files, global_batch_size=37)
    seen = np.bincount([_origin(row)[0] for _ in range(5) for row in data.next_batch()], minlength=3)
    assert np.all(np.abs(seen - 185 * np.array([112, 45, 28]) / 185) <= 1)


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_slices_concatenate_to_dp1(files, dp_size):
    ref = _make(files)
    ranks = [_make(files, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    for _ in range(4):
        parts = [r.next_batch() for r in ranks]
        assert all(p.shape == (8 // dp_size, 9) for p in parts)
        assert torch.equal(torch.cat(parts), ref.next_batch())


def test_resume_is_exact(files):
    run = _make(files, weights=[1, 2, 3])
    for _ in range(7):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # plain ints/lists survive JSON
    assert state["batches"] == 7 and sum(state["samples_per_dataset"]) == 56
    resumed = _make(files, weights=[1, 2, 3])
    resumed.load_state_dict(state)
    resumed_dp = [_make(files, weights=[1, 2, 3], dp_rank=r, dp_size=2) for r in range(2)]
    for r in resumed_dp:
        r.load_state_dict(state)  # resume on another dp layout
    for _ in range(5):
        expected = run.next_batch()
        assert torch.equal(resumed.next_batch(), expected)
        assert torch.equal(torch.cat([r.next_batch() for r in resumed_dp]), expected)


def test_resume_far_ahead_is_cheap(files):
    data = _make(files[:1], global_batch_size=2)
    state = data.state_dict()
    state["samples_per_dataset"] = [10**9 + 5]
    data.load_state_dict(state)
    start = time.perf_counter()
    rows = data.next_batch()
    assert time.perf_counter() - start < 1.0
    epoch, k = divmod(10**9 + 5, 112)
    expected = [8 * int(np.random.default_rng((0, 0, epoch)).permutation(112)[i]) for i in (k, k + 1)]
    assert [_origin(r)[1] for r in rows] == expected


def test_load_state_dict_rejects_other_settings(files):
    state = _make(files).state_dict()
    with pytest.raises(ValueError, match=r"data state seed \(0\) does not match"):
        _make(files, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_windows"):
        _make(files[:2]).load_state_dict(state)
    state["samples_per_dataset"] = [1, -1, 0]
    with pytest.raises(ValueError, match="non-negative ints"):
        _make(files).load_state_dict(state)


def test_train_valid_disjoint_and_valid_reset(files):
    train, valid = _make(files[:1], split="train"), _make(files[:1], split="valid")
    assert (train.num_windows, valid.num_windows) == ([112], [12])
    t_starts = {_origin(r)[1] for _ in range(14) for r in train.next_batch()}  # one epoch
    v_first = [valid.next_batch() for _ in range(3)]
    v_starts = {_origin(r)[1] for b in v_first for r in b}
    assert t_starts.isdisjoint(v_starts) and len(t_starts | v_starts) == 124
    t_targets = {s + i for s in t_starts for i in range(1, 9)}
    v_targets = {s + i for s in v_starts for i in range(1, 9)}
    assert t_targets.isdisjoint(v_targets)  # no target token is in both splits
    assert min(v_starts) == 8 * 112  # validation is the end of the file
    valid.reset()
    assert all(torch.equal(b, valid.next_batch()) for b in v_first)


def test_sampler_argument_errors(files, tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) must be divisible by dp_size \(4\)"):
        _make(files, global_batch_size=6, dp_size=4)
    with pytest.raises(ValueError, match=r"f2: 250 tokens give 31 windows .* 'valid' split is empty"):
        _make(files, split="valid", valid_fraction=0.03)
    with pytest.raises(ValueError, match=r"f0: 1000 tokens give 0 windows"):
        _make(files, seq_len=2000)
    with pytest.raises(ValueError, match="weights"):
        _make(files, weights=[1, -1, 1])
    with pytest.raises(ValueError, match="split"):
        _make(files, split="test")
    write_token_file(tmp_path / "bytes", [list(range(100))], vocab_size=257)
    with pytest.raises(ValueError, match="disagree on vocab_size"):
        _make([files[0], str(tmp_path / "bytes")])


# ------------------------------------------------------------------------------ default corpus
def test_default_corpus_built_once_and_reused(tmp_path):
    cache = tmp_path / "cache"
    prefix = ensure_default_corpus(cache, BYTE, max_bytes=200_000)
    assert prefix == default_corpus_prefix(cache, "byte") == str(cache / "stdlib-byte")
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files(200_000)]
    texts = [t for t in texts if t]  # empty __init__.py files make no document
    tf = TokenFile(prefix)
    assert tf.num_docs == len(texts) > 5
    assert tf.num_tokens == sum(len(t.encode()) + 1 for t in texts) <= 200_000 + tf.num_docs
    assert BYTE.decode(tf.doc(0)) == texts[0]
    before = os.stat(f"{prefix}.bin")
    assert ensure_default_corpus(cache, BYTE, max_bytes=200_000) == prefix
    after = os.stat(f"{prefix}.bin")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert resolve_data_paths(["stdlib", "x/y.bin"], cache, BYTE) == [prefix, "x/y"]


def test_default_corpus_waits_for_lock_holder(tmp_path):
    """While another builder holds the lock, a caller waits, then reuses what it built."""
    cache = tmp_path / "cache"
    cache.mkdir()
    prefix = default_corpus_prefix(cache, "byte")
    result = []
    with open(f"{prefix}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(
            ensure_default_corpus(cache, BYTE, max_bytes=50_000)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and not os.path.exists(f"{prefix}.idx")
        write_token_file(prefix, [[1, 2, 3]], vocab_size=257)  # the "other process" builds
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(timeout=10)
    assert result == [prefix] and TokenFile(prefix).doc(0).tolist() == [1, 2, 3]  # reused


@pytest.mark.slow
def test_default_corpus_concurrent_processes(tmp_path):
    code = ("import sys; from train.data import ByteTokenizer, ensure_default_corpus, TokenFile; "
            "p = ensure_default_corpus(sys.argv[1], ByteTokenizer(), max_bytes=300_000); "
            "print(TokenFile(p).num_tokens)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and len(set(outs)) == 1 and int(outs[0]) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stdlib-byte.bin", "stdlib-byte.idx",
                                                          "stdlib-byte.lock"]


@pytest.mark.slow
def test_cli_runs_as_plain_script(tmp_path):
    corpus = _write_corpus(tmp_path / "in")
    out = subprocess.run([sys.executable, str(REPO / "launchers" / "preprocess.py"),
                          str(tmp_path / "in"), "--output", str(tmp_path / "o")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4 docs" in out.stdout and "files" in out.stderr  # summary + progress bar
    tf = TokenFile(tmp_path / "o")
    assert BYTE.decode(tf.doc(3)) == corpus["texts"][3]
