"""Chat templates and response-only loss masks for SFT (and DPO's prompt/completion pairs).

A conversation is rendered to text by a Jinja chat template - HF's own format: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, rendered in a sandbox as transformers does -
either the built-in one or the `chat_template` of an HF tokenizer_config.json (or a .jinja file).
Which tokens are the assistant's is found by rendering prefixes: for the assistant message i,
P_i = render(messages[:i], add_generation_prompt=True) and F_i = render(messages[:i + 1]); the
response is F_i[len(P_i):], the text between F_{i-1} and P_i is context. Each piece is tokenized
on its own, so the mask is exact at token boundaries (with BPE tokenizers a piece boundary may
tokenize differently than the joined text would; templates put special tokens there, where it
does not). A template that does not render prefixes of the conversation as prefixes of its text
cannot be masked this way and is an error naming the example.

The built-in template and `none` (plain prompt + response, no template) end each response with
the tokenizer's EOS id (a byte tokenizer has no EOS text); HF templates write their own
end-of-turn text.
"""

from __future__ import annotations

import json
from pathlib import Path

from .examples import Source, TokenSeq, text_field

BUILTIN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
ROLES = ("system", "user", "assistant")
NOT_EXTENDING = ("the chat template does not render message {i} as an extension of the messages "
                 "before it, so the response cannot be masked: use task.chat_template=builtin or a "
                 "template that does")


def _special(cfg: dict, name: str) -> str:
    value = cfg.get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else str(value)


def _from_tokenizer_config(path: Path, required: bool) -> tuple[str | None, dict]:
    """(chat_template, tokenizer_config) of a tokenizer_config.json; a list of named templates
    picks "default"."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"task.chat_template: cannot read {path} ({type(e).__name__})") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if required and not isinstance(template, str):
        raise ValueError(f"task.chat_template={path}: the file has no chat_template string: use "
                         f"builtin or a .jinja file")
    return template, cfg


def _shipped(tokenizer: Path) -> tuple[str | None, dict]:
    """The template an HF tokenizer ships beside its tokenizer.json: chat_template.jinja, else
    the chat_template of tokenizer_config.json (whose bos/eos tokens the template may use)."""
    folder = tokenizer if tokenizer.is_dir() else tokenizer.parent
    config = folder / "tokenizer_config.json"
    template, cfg = (None, {})
    if config.is_file():
        template, cfg = _from_tokenizer_config(config, required=False)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return (template if isinstance(template, str) else None), cfg


def resolve_template(spec: str, tokenizer_spec: str) -> tuple[str | None, dict, bool]:
    """(template source or None for plain text, tokenizer_config, appends_eos) for
    task.chat_template: auto | builtin | none | a tokenizer_config.json | a .jinja file."""
    if spec == "none":
        return None, {}, True
    if spec == "builtin":
        return BUILTIN_TEMPLATE, {}, True
    if spec == "auto":
        template, cfg = (None, {}) if tokenizer_spec == "byte" else _shipped(Path(tokenizer_spec))
        return (BUILTIN_TEMPLATE, {}, True) if template is None else (template, cfg, False)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"task.chat_template={spec}: no such file; use auto, builtin, "
                                f"none, a tokenizer_config.json or a .jinja file")
    if path.suffix == ".json":
        template, cfg = _from_tokenizer_config(path, required=True)
        return template, cfg, False
    return path.read_text(), _shipped(path)[1], False


def _compile(source: str):
    """The template in a sandbox, with transformers' conventions (trim_blocks, lstrip_blocks,
    raise_exception); jinja2 comes with torch."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"task.chat_template: not a valid Jinja template ({e})") from None


class ChatEncoder:
    """Conversations -> TokenSeq with the loss on assistant tokens only (the module docstring)."""

    def __init__(self, tokenizer, spec: str, tokenizer_spec: str):
        self.tok = tokenizer
        source, cfg, self.appends_eos = resolve_template(spec, tokenizer_spec)
        self.template = None if source is None else _compile(source)
        self.specials = {k: _special(cfg, k) for k in ("bos_token", "eos_token")}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    **self.specials)

    def pieces(self, messages: list[dict], src: Source) -> list[tuple[str, bool]]:
        """(text, is_response) pieces whose concatenation is the rendered conversation."""
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, full = self.render(messages[:i], True), self.render(messages[:i + 1], False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise ValueError(f"{src}: " + NOT_EXTENDING.format(i=i))
            out += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        whole = self.render(messages, False)
        if not whole.startswith(done):
            raise ValueError(f"{src}: " + NOT_EXTENDING.format(i=len(messages) - 1))
        out.append((whole[len(done):], False))
        return [(text, response) for text, response in out if text]

    def encode(self, messages: list[dict], src: Source) -> TokenSeq:
        """Tokens of the rendered conversation; the loss on the assistant pieces (and the EOS
        appended after each by the built-in template and `none`)."""
        if self.template is None:
            if [m["role"] for m in messages] != ["user", "assistant"]:
                raise ValueError(f"{src}: 'messages' need a chat template but task.chat_template "
                                 f"is none: use auto or builtin, or give prompt/response pairs")
            pieces = [(messages[0]["content"], False), (messages[1]["content"], True)]
        else:
            pieces = self.pieces(messages, src)
        tokens, loss = [], []
        for text, response in pieces:
            ids = self.tok.encode(text)
            if response and self.appends_eos:
                ids.append(self.tok.eos_id)
            tokens += ids
            loss += [response] * len(ids)
        return TokenSeq(tokens, loss)


def messages_of(src: Source, obj: dict) -> list[dict]:
    """The conversation of an SFT record: `messages` [{role, content}], or prompt/response as one
    user and one assistant turn. Errors name the line and the problem."""
    if "messages" not in obj:
        needs = "task.kind=sft reads prompt and response, or messages"
        prompt = text_field(src, obj, "prompt", needs, allow_empty=True)
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": text_field(src, obj, "response", needs)}]
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{src}: field 'messages' must be a non-empty list of {{role, content}} "
                         f"objects")
    for k, m in enumerate(msgs):
        _check_message(src, k, m)
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{src}: messages have no assistant turn, so there is no response to "
                         f"train on")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _check_message(src: Source, k: int, m) -> None:
    ok = isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
    if not ok:
        raise ValueError(f"{src}: messages[{k}] must be {{\"role\": one of {list(ROLES)}, "
                         f"\"content\": a string}}, got {json.dumps(m)[:80]}")
    if m["role"] == "assistant" and not m["content"].strip():
        raise ValueError(f"{src}: empty response in messages[{k}]: every assistant turn needs text")
