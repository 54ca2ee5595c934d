"""Post-training tasks (train/tasks/): losses against hand-computed values, response-only masks,
packed == unpacked per-example losses, bad input, the example stream, starting weights from our
own checkpoints, and resuming a task run.

Runs on CPU, float32, one thread, with a ~80k-parameter model and JSONL files written here."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe.config import get_preset
from moe.layers import document_layout
from moe.model import build_model
from parallel.context import ParallelContext
from train.config import load_config
from train.data import ByteTokenizer, write_token_file
from train.tasks.chat import ChatEncoder
from train.tasks.classify import classify_objective
from train.tasks.dpo import DPOTargets, DPOTask, dpo_loss
from train.tasks.examples import (IGNORE, ExampleStream, Source, TokenSeq, pack, row_arrays,
                                  stack_rows)
from train.trainer import Trainer

SHRINK = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
          "model.ffn_dim=128"]
MOE = ["model.preset=tiny-moe", *SHRINK, "model.expert_ffn_dim=32", "model.n_experts=4"]
SRC = Source("x.jsonl", 1)


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def words(i: int, n: int) -> str:
    return " ".join(f"w{(i * 7 + k) % 13}" for k in range(n))


def classify_records(n: int = 24) -> list[dict]:
    return [{"text": words(i, 3 + i % 4), "label": ["a", "b", "c"][i % 3]} for i in range(n)]


def sft_records(n: int = 24) -> list[dict]:
    out = []
    for i in range(n):
        if i % 2:
            out.append({"prompt": f"q{i}: {words(i, 2)}", "response": words(i + 1, 3)})
        else:
            out.append({"messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": words(i, 2)},
                                     {"role": "assistant", "content": words(i, 2 + i % 3)}]})
    return out


def dpo_records(n: int = 24) -> list[dict]:
    return [{"prompt": f"p{i}:", "chosen": words(i, 3), "rejected": words(i + 5, 4)}
            for i in range(n)]


RECORDS = {"classify": classify_records, "sft": sft_records, "dpo": dpo_records}


def task_cfg(tmp_path: Path, kind: str, *extra: str, records=None, run: str = "run"):
    records = records if records is not None else RECORDS[kind]()
    data = write_jsonl(tmp_path / f"{kind}.jsonl", records)
    base = [*MOE, "data.seq_len=64", "training.precision=fp32", "training.device=cpu",
            "training.global_batch_size=8", "training.micro_batch_size=2", "training.max_steps=4",
            "training.eval_interval=0", "training.eval_steps=4", "logging.tensorboard=false",
            "logging.interval=1000", "checkpoint.interval=0", f"run_dir={tmp_path / run}",
            f"task.kind={kind}", f"task.data={data}", "task.valid_fraction=0.25",
            "optimizer.lr=3e-3", "schedule.warmup_steps=0"]
    return load_config(None, base + list(extra))


def trainer(cfg) -> Trainer:
    return Trainer(cfg, ParallelContext.single(), log=lambda msg: None)


# ------------------------------------------------------------------------- losses by hand
def test_classify_objective_is_l2_plus_lambda_l1():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = torch.tensor([0, 2])
    lse0 = math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-1.0))
    lse1 = math.log(math.exp(0.5) + math.exp(1.5) + math.exp(0.0))
    l2 = ((lse0 - 2.0) + (lse1 - 0.0)) / 2
    l3, got_l2 = classify_objective(logits, labels, torch.tensor(3.0), lm_coef=0.25)
    assert got_l2.item() == pytest.approx(l2, rel=1e-6)
    assert l3.item() == pytest.approx(l2 + 0.75, rel=1e-6)
    l3, _ = classify_objective(logits, labels, torch.tensor(3.0), lm_coef=0.0)
    assert l3.item() == pytest.approx(l2, rel=1e-6)
    # a weight-0 row (validation filler) does not count
    weight = torch.tensor([1.0, 0.0])
    l3, got_l2 = classify_objective(logits, labels, torch.tensor(0.0), 0.5, weight=weight)
    assert got_l2.item() == pytest.approx(lse0 - 2.0, rel=1e-6)


POLICY_W, POLICY_L = [-10.0, -20.0, -7.0], [-12.0, -15.0, -9.0]
REF_W, REF_L = [-11.0, -19.0, -7.5], [-11.0, -16.0, -8.0]
BETA = 0.5
# r_w = 0.5 * (1, -1, 0.5) ; r_l = 0.5 * (-1, 1, -1)
R_W, R_L = [0.5, -0.5, 0.25], [-0.5, 0.5, -0.5]


def test_dpo_loss_rewards_and_accuracy_by_hand():
    t = torch.tensor
    loss, chosen, rejected = dpo_loss(t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L), BETA)
    want = [math.log1p(math.exp(-(w - r))) for w, r in zip(R_W, R_L)]  # -log sigmoid(m)
    assert loss.tolist() == pytest.approx(want, rel=1e-6)
    assert chosen.tolist() == pytest.approx(R_W) and rejected.tolist() == pytest.approx(R_L)


class _FakeChunk:
    """token_losses returns fixed per-token losses whose row sums are -log-probs: the rows of a
    micro-batch are the chosen sequences then the rejected ones."""

    def __init__(self, logps: list[float]):
        per_token = torch.zeros(len(logps), 4)
        per_token[:, 1] = -torch.tensor(logps) / 2
        per_token[:, 3] = -torch.tensor(logps) / 2
        self.per_token = per_token

    def token_losses(self, logits, labels):
        return self.per_token


def test_dpo_step_metrics_use_trl_definitions():
    task = DPOTask(SimpleNamespace(task=SimpleNamespace(beta=BETA)))
    chunk = _FakeChunk(POLICY_W + POLICY_L)
    target = DPOTargets(labels=torch.zeros(6, 4, dtype=torch.long),
                        ref=torch.tensor([REF_W, REF_L]).T, weight=torch.ones(3))
    loss, stats = task.last_stage(chunk, SimpleNamespace(logits=None), target, "train")
    margins = [w - r for w, r in zip(R_W, R_L)]
    want = sum(math.log1p(math.exp(-m)) for m in margins) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    got = dict(zip(task.scalar_names, stats.tolist()))
    assert got["rewards/chosen"] == pytest.approx(sum(R_W) / 3)
    assert got["rewards/rejected"] == pytest.approx(sum(R_L) / 3)
    assert got["rewards/accuracies"] == pytest.approx(2 / 3)  # pairs 0 and 2 prefer the chosen
    assert got["rewards/margins"] == pytest.approx(sum(margins) / 3)
    assert got["logps/chosen"] == pytest.approx(sum(POLICY_W) / 3)
    assert got["logps/rejected"] == pytest.approx(sum(POLICY_L) / 3)
    filler = DPOTargets(target.labels, target.ref, torch.tensor([1.0, 0.0, 1.0]))  # pair 1 left out
    sums, _ = task.last_stage(chunk, SimpleNamespace(logits=None), filler, "eval")
    metrics = task.eval_metrics(dict(zip(task.eval_names, sums.tolist())))
    assert metrics["rewards/accuracies"] == pytest.approx(1.0)
    assert metrics["rewards/margins"] == pytest.approx((margins[0] + margins[2]) / 2)


# ------------------------------------------------------------------------- masks, rows, packing
TOK = ByteTokenizer()
CONVERSATION = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"}]


def _trained_text(seq: TokenSeq) -> list[str]:
    """The runs of trained tokens, decoded (EOS shown as <eos>)."""
    runs, cur = [], []
    for t, on in zip(seq.tokens + [None], seq.loss + [False]):
        if on:
            cur.append(t)
        elif cur:
            runs.append("".join("<eos>" if x == TOK.eos_id else chr(x) for x in cur))
            cur = []
    return runs


def test_builtin_template_trains_on_assistant_turns_only():
    seq = ChatEncoder(TOK, "builtin", "byte").encode(CONVERSATION, SRC)
    assert _trained_text(seq) == ["A1\n<eos>", "A2\n<eos>"]
    text = TOK.decode(seq.tokens)
    assert text == ("<|system|>\nS\n<|user|>\nU1\n<|assistant|>\nA1\n<|user|>\nU2\n"
                    "<|assistant|>\nA2\n")
    plain = ChatEncoder(TOK, "none", "byte").encode(CONVERSATION[1:3], SRC)
    assert plain.tokens == list(b"U1A1") + [TOK.eos_id] and _trained_text(plain) == ["A1<eos>"]


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_hf_tokenizer_config_template_masks_the_assistant_turns(tmp_path):
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    enc = ChatEncoder(TOK, str(tmp_path / "tokenizer_config.json"), "byte")
    seq = enc.encode(CONVERSATION, SRC)
    assert _trained_text(seq) == ["A1<|im_end|>\n", "A2<|im_end|>\n"]  # its end-of-turn, no EOS id
    reverse = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "bad.jinja").write_text(reverse)
    with pytest.raises(ValueError, match=r"x\.jsonl:1: the chat template does not render message"):
        ChatEncoder(TOK, str(tmp_path / "bad.jinja"), "byte").encode(CONVERSATION, SRC)


def test_auto_template_is_the_one_shipped_beside_an_hf_tokenizer(tmp_path):
    """task.chat_template=auto with data.tokenizer an HF tokenizer.json: the chat_template of the
    tokenizer_config.json beside it, whose special tokens are single tokens of the tokenizer."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from train.data import HFTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system A1 A2 U1 U2 S"] * 4, bpe)
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = HFTokenizer(str(tmp_path / "tokenizer.json"))
    seq = ChatEncoder(hf, "auto", str(tmp_path / "tokenizer.json")).encode(CONVERSATION, SRC)
    trained = [t for t, on in zip(seq.tokens, seq.loss) if on]
    assert hf._tok.decode(trained, skip_special_tokens=False) == "A1<|im_end|>\nA2<|im_end|>\n"
    assert trained.count(hf._tok.token_to_id("<|im_end|>")) == 2  # one token each, no EOS appended
    assert hf.decode(seq.tokens).startswith("system\nS\n")  # special tokens dropped by decode


def test_row_labels_are_next_token_targets_of_trained_tokens():
    a = TokenSeq([10, 11, 12, 13], [False, False, True, True])
    b = TokenSeq([20, 21, 22], [False, True, True])
    row = row_arrays([a, b], 8, pad_id=256)
    assert row["tokens"].tolist() == [10, 11, 12, 20, 21, 256, 256, 256]
    assert row["labels"].tolist() == [IGNORE, 12, 13, 21, 22, IGNORE, IGNORE, IGNORE]
    assert row["doc_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert pack([3, 4, 2, 5, 1], 6) == [[0], [1, 2], [3, 4]]


def test_document_layout_mask_and_positions():
    mask, pos = document_layout(torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 7, 5]]))
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 0]]  # 5 again after 7: a new run
    want = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in ((0, 2), (2, 5), (5, 6)):
        want[lo:hi, lo:hi] = torch.tril(torch.ones(hi - lo, hi - lo, dtype=torch.bool))
    assert torch.equal(mask[0, 0], want)
    assert mask.shape == (2, 1, 6, 6) and not mask[1, 0, 5, :5].any()


PACKING_MODELS = [("tiny-moe", dict(n_experts=4, expert_ffn_dim=32)),
                  ("tiny", dict(positions="learned", norm="layernorm", bias=True)),
                  ("tiny", dict(local_window=3, local_layers="odd"))]


@pytest.mark.parametrize("preset, extra", PACKING_MODELS,
                         ids=["rope_moe", "learned_positions", "local_window"])
def test_packed_examples_get_their_unpacked_losses(preset, extra):
    """Three examples packed into one row with document ids give, token for token, the losses each
    gets alone in its own row: no attention across examples, positions restarting at each (learned
    positions need the restart; RoPE scores depend only on relative positions, so for RoPE it is
    the mask alone that matters)."""
    cfg = get_preset(preset, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_dim=128, **extra)
    model = build_model(cfg, seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    seqs = [TokenSeq(torch.randint(0, 256, (n,), generator=gen).tolist(), [k > 1 for k in range(n)])
            for n in (9, 13, 6)]
    row = {k: torch.from_numpy(v)[None] for k, v in row_arrays(seqs, 32, pad_id=256).items()}
    with torch.no_grad():
        out = model(row["tokens"], doc_ids=row["doc_ids"])
        packed = model.token_losses(out.logits, row["labels"])[0]
        start = 0
        for s in seqs:
            arrays = row_arrays([s], len(s.tokens) - 1, 256)
            alone = {k: torch.from_numpy(v)[None] for k, v in arrays.items()}
            want = model.token_losses(model(alone["tokens"]).logits, alone["labels"])[0]
            got = packed[start:start + len(want)]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            start += len(want)
    assert (packed[start:] == 0).all()


# ------------------------------------------------------------------------- the stream
def _collate(ids, weights):
    return stack_rows([{"item": np.int64(i)} for i in ids], weights)


def test_example_stream_is_layout_independent_resumable_and_ordered():
    one = ExampleStream(10, _collate, global_batch_size=4, seed=3)
    ranks = [ExampleStream(10, _collate, global_batch_size=4, seed=3, dp_rank=r, dp_size=2)
             for r in range(2)]
    seen = []
    for _ in range(5):  # crosses an epoch: every item once per epoch
        batch = one.next_batch()["item"].tolist()
        assert sum((r.next_batch()["item"].tolist() for r in ranks), []) == batch
        seen += batch
    assert sorted(seen[:10]) == list(range(10)) and seen[:10] != list(range(10))
    state = one.state_dict()
    after = [one.next_batch()["item"].tolist() for _ in range(2)]
    resumed = ExampleStream(10, _collate, global_batch_size=4, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next_batch()["item"].tolist() for _ in range(2)] == after
    with pytest.raises(ValueError, match=r"data state items \(10\) does not match .* \(11\)"):
        ExampleStream(11, _collate, global_batch_size=4, seed=3).load_state_dict(state)
    batches = list(ranks[1].ordered_batches())
    assert [b["item"].tolist() for b in batches] == [[2, 3], [6, 7], [0, 0]]
    assert [b["weight"].tolist() for b in batches][-1] == [0.0, 0.0]


# ------------------------------------------------------------------------- bad input
def _build_data(cfg):
    from train.tasks import make_task

    task = make_task(cfg)
    fake = SimpleNamespace(cfg=cfg, ctx=ParallelContext.single(), dp=1, _log=lambda msg: None)
    return task, task.build_data(fake)


BAD = [
    ("classify", ['{"text": "ok", "label": "a"}', '{"text": "x", "label": "b"', ], r":2: bad JSON"),
    ("classify", [{"text": "ok", "label": "a"}, {"label": "b"}], r":2: missing field 'text'"),
    ("classify", [{"text": "ok", "label": "a"}, {"text": "t"}], r":2: missing field 'label'"),
    ("classify", [{"text": 3, "label": "a"}], r":1: field 'text' must be a string, got int"),
    ("sft", [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "  "}],
     r":2: empty response"),
    ("sft", [{"messages": [{"role": "user", "content": "u"},
                           {"role": "assistant", "content": ""}]}],
     r":1: empty response in messages\[1\]"),
    ("sft", [{"messages": [{"role": "robot", "content": "u"}]}], r":1: messages\[0\] must be"),
    ("sft", [{"messages": [{"role": "user", "content": "u"}]}],
     r":1: messages have no assistant turn"),
    ("dpo", [{"prompt": "p", "chosen": "c"}], r":1: missing field 'rejected'"),
    ("dpo", [{"prompt": "p", "chosen": "c", "rejected": ""}], r":1: empty response"),
    ("sft", ["[1, 2]"], r":1: expected a JSON object, got list"),
]


@pytest.mark.parametrize("kind, lines, pattern", BAD, ids=[f"{k}-{p}" for k, _, p in BAD])
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, kind, lines, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    cfg = task_cfg(tmp_path, kind, f"task.valid_data={path}")  # a good train file, this held out
    with pytest.raises(ValueError, match=f"^{path}{pattern}") as err:
        _build_data(cfg)
    assert "\n" not in str(err.value)


def test_unknown_label_names_the_line_and_the_labels(tmp_path):
    records = [{"text": "t", "label": "a"}, {"text": "t", "label": "zz"}]
    valid = write_jsonl(tmp_path / "valid.jsonl", records)
    pattern = rf"^{valid}:2: unknown label 'zz': the labels are \['a', 'b', 'c'\]"
    with pytest.raises(ValueError, match=pattern):
        _build_data(task_cfg(tmp_path, "classify", f"task.valid_data={valid}"))
    with pytest.raises(ValueError, match=r"\.jsonl:3: unknown label 'c'"):  # task.labels names them
        _build_data(task_cfg(tmp_path, "classify", "task.labels=[a, b]"))


def test_too_long_examples_error_or_are_cut_counted_and_reported(tmp_path):
    pairs = [r for r in sft_records(16) if "prompt" in r]
    long = [{"prompt": "p" * 10, "response": "r" * 60}] + pairs  # 10 + 60 + EOS = 71 tokens
    plain = "task.chat_template=none"
    with pytest.raises(ValueError, match=r"sft\.jsonl:1: example is 71 tokens, longer than the 65"):
        _build_data(task_cfg(tmp_path, "sft", "task.truncate=false", plain, records=long))
    task, _ = _build_data(task_cfg(tmp_path, "sft", plain, records=long))
    count = task.truncation["train"]
    assert (count.cut_examples, count.cut_tokens) == (1, 71 - 65)
    assert count.fraction == pytest.approx(6 / count.tokens)
    prompt_fills = [{"prompt": "p" * 70, "response": "r"}] + pairs
    task, _ = _build_data(task_cfg(tmp_path, "sft", plain, records=prompt_fills))
    assert task.truncation["train"].dropped == 1
    summary = task.truncation["train"].summary("train")
    assert "1 dropped: no response token left after the prompt (first at " in summary


@pytest.mark.parametrize("override, pattern", [
    ("task.kind=rl", r"task\.kind \('rl'\) must be one of \['lm', 'classify', 'sft', 'dpo'\]"),
    ("task.beta=0", r"task\.beta \(0\.0\) must be > 0"),
    ("task.lm_coef=-1", r"task\.lm_coef \(-1\.0\) must be >= 0"),
    ("task.labels=[a, a]", r"task\.labels \(\['a', 'a'\]\) must name at least 2 distinct labels"),
    ("task.valid_fraction=1.5", r"task\.valid_fraction \(1\.5\) must be in \(0, 1\)"),
    ("task.lables=[a, b]", r"unknown config key task\.lables; did you mean task\.labels\?"),
])
def test_task_config_errors_name_the_field(override, pattern):
    with pytest.raises(ValueError, match=pattern) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------- starting weights, resume
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 2-step LM run of the MOE model on random bytes: its run_dir holds one checkpoint."""
    tmp = tmp_path_factory.mktemp("pre")
    prefix = str(tmp / "tokens")
    write_token_file(prefix, [np.random.default_rng(0).integers(0, 256, 3000)], vocab_size=257)
    cfg = load_config(None, [*MOE, f"data.paths=[{prefix}]", "data.seq_len=32",
                             "training.device=cpu", "training.precision=fp32",
                             "training.global_batch_size=4", "training.micro_batch_size=2",
                             "training.max_steps=2", "training.eval_interval=0",
                             "logging.tensorboard=false", "checkpoint.interval=0",
                             "optimizer.lr=1e-2", f"run_dir={tmp / 'run'}"])
    trainer(cfg).train()
    return tmp / "run"


def test_init_from_our_checkpoint_loads_the_backbone_and_adds_the_head(tmp_path, pretrained):
    from train.checkpoint import find_checkpoint, load_full_model_state

    saved = load_full_model_state(find_checkpoint(pretrained))
    t = trainer(task_cfg(tmp_path, "classify", f"checkpoint.init_from={pretrained}"))
    state = t.model.state_dict()
    assert set(state) == set(saved) | {"cls_head.weight", "cls_head.bias"}
    vocab = t.cfg.model.vocab_size  # init_from keeps the real vocabulary rows, zeros the padding
    for name, want in saved.items():
        rows = slice(0, vocab) if name in ("tok_emb.weight", "head.weight") else slice(None)
        assert torch.equal(state[name][rows], want[rows]), name
    assert state["cls_head.weight"].shape == (3, 64) and state["cls_head.weight"].std() > 0
    pattern = (r"init_from=.*run/checkpoints/step_00000002: model\.d_model is 32 here but 64 in "
               r"that checkpoint: set model\.d_model=64")
    with pytest.raises(ValueError, match=pattern):
        trainer(task_cfg(tmp_path, "classify", f"checkpoint.init_from={pretrained}",
                         "model.d_model=32"))
    with pytest.raises(FileNotFoundError, match=r"init_from=.*nowhere: neither one of our"):
        trainer(task_cfg(tmp_path, "sft", f"checkpoint.init_from={tmp_path / 'nowhere'}"))


def test_dpo_reference_from_another_checkpoint(tmp_path, pretrained):
    """task.reference: log-probs from those weights (rewards at step 0 are then not zero), and the
    policy keeps its own starting weights; with the reference = the starting weights, zero."""
    same = trainer(task_cfg(tmp_path, "dpo", f"checkpoint.init_from={pretrained}", run="same"))
    other = trainer(task_cfg(tmp_path, "dpo", f"task.reference={pretrained}", run="other"))
    fresh = trainer(task_cfg(tmp_path, "dpo", run="fresh"))  # random init, its own reference
    for name, p in other.model.state_dict().items():
        assert torch.equal(p, fresh.model.state_dict()[name]), name  # the reference swapped back
    assert torch.allclose(torch.tensor(np.stack([i[2] for i in other.task.items["train"]])),
                          torch.tensor(np.stack([i[2] for i in same.task.items["train"]])))
    assert other.evaluate()["rewards/margins"] != 0.0 and same.evaluate()["rewards/margins"] == 0.0


@pytest.mark.parametrize("kind", ["classify", "sft", "dpo"])
def test_task_run_resumes_exactly(tmp_path, kind):
    """4 steps in one go == 2 steps, a checkpoint, a new trainer resumed for 2 more (head, optimizer
    state and the example stream's position restored)."""
    whole = trainer(task_cfg(tmp_path, kind, run="whole"))
    losses = [whole.train_step()["loss"] for _ in range(4)]
    first = trainer(task_cfg(tmp_path, kind, run="split"))
    for _ in range(2):
        first.train_step()
    first.save()
    resumed = trainer(task_cfg(tmp_path, kind, "checkpoint.resume=auto", run="split"))
    assert resumed.step == 2
    assert [resumed.train_step()["loss"] for _ in range(2)] == pytest.approx(losses[2:], rel=1e-6)


def test_task_section_is_documented():
    """docs/configuration.md (generated) has a row for every task.* field, and the post-training
    guide names every task kind."""
    import dataclasses
    import re

    from train.config import TASK_KINDS, TaskConfig

    docs = Path(__file__).resolve().parents[1] / "docs"
    body = (docs / "configuration.md").read_text().split("## `task`", 1)[1].split("\n## ", 1)[0]
    for f in dataclasses.fields(TaskConfig):
        assert re.search(rf"^\| `{f.name}` \| .+ \| \S", body, re.M), f"task.{f.name} undocumented"
    guide = (docs / "post-training.md").read_text()
    assert all(f"`{kind}`" in guide for kind in TASK_KINDS)


def test_finetune_launcher_errors_are_one_line(tmp_path, capsys):
    """A bad record: one line naming file:line, status 2 (bad input, found while building the
    run); a pretraining config: status 2 before any work; no starting weights: a warning."""
    from launchers.finetune import main

    data = write_jsonl(tmp_path / "pairs.jsonl", dpo_records(3) + [{"prompt": "p", "chosen": "c"}])
    args = [f"task.data={data}", "task.valid_fraction=0.25", "task.kind=dpo", *MOE,
            "data.seq_len=64", "training.device=cpu", "logging.tensorboard=false",
            f"run_dir={tmp_path / 'run'}"]
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    assert main([str(config), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: checkpoint.init_from is not set")
    assert err[1:] == [f"error: {data}:4: missing field 'rejected' "
                       f"(task.kind=dpo reads prompt, chosen and rejected)"]
    assert main([str(config), *args, "task.kind=lm"]) == 2
    assert capsys.readouterr().err.startswith("error: task.kind is lm (pretraining): set task.kind")


def test_global_batch_prepass_routes_packed_rows_as_training_does(tmp_path):
    """model.aux_loss_scope=global_batch counts the step's expert loads in a no-grad pre-pass;
    with packed SFT rows it must see the same document masks as the training pass, so the loads
    it counts equal the ones training routes."""
    t = trainer(task_cfg(tmp_path, "sft", "model.aux_loss_scope=global_batch"))
    stats = t.forward_backward()
    assert stats["loads"] and set(t.step_loads) == set(stats["loads"])
    for layer, trained in stats["loads"].items():
        assert torch.equal(t.step_loads[layer].long(), trained), layer


def test_resumed_run_logs_its_step_zero_rows_once(tmp_path):
    """The truncation report and the step-0 validation belong to the run's start: a resumed run
    (whose metrics.jsonl already holds them up to its step) does not append them again."""
    first = task_cfg(tmp_path, "sft", "training.max_steps=2", "training.eval_interval=2")
    trainer(first).train()
    again = task_cfg(tmp_path, "sft", "training.max_steps=4", "training.eval_interval=2",
                     "checkpoint.resume=auto")
    t = trainer(again)
    assert t.step == 2
    t.train()
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    at_zero = [r.get("split", "train") for r in rows if r["step"] == 0]
    assert sorted(at_zero) == ["data", "valid"]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2, 3, 4]
