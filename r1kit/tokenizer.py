"""Tokenizers and the R1 chat templates.

The one place where a completion is split into (reasoning, answer): training rewards, evaluation,
`r1kit chat` and `r1kit serve` all call `split_reasoning`, so they agree on what the thinking is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str | None  # text of the thinking; None when the completion has no thinking at all
    answer: str  # text after </think> (or the whole text when there is no thinking)
    closed: bool  # the thinking was closed by </think> (False: truncated inside the thinking)


def split_reasoning(completion: str, prompt_opened_think: bool | None = None) -> ReasoningSplit:
    """Split a completion into its reasoning and its answer.

    `prompt_opened_think`: the prompt already ended in `<think>` (R1's generation prompt does), so
    the completion holds only the closing tag. None detects it: a `</think>` with no `<think>`
    before it means the thinking was opened by the prompt.
    """
    text = completion
    open_at = text.find(THINK_OPEN)
    close_at = text.find(THINK_CLOSE)
    if prompt_opened_think is None:
        prompt_opened_think = close_at != -1 and (open_at == -1 or open_at > close_at)
    if prompt_opened_think:
        start = 0
    elif open_at != -1 and text[:open_at].strip() == "":
        start = open_at + len(THINK_OPEN)
    else:
        # no thinking opened at the start: the whole text is the answer
        return ReasoningSplit(reasoning=None, answer=text.strip(), closed=False)
    close_at = text.find(THINK_CLOSE, start)
    if close_at == -1:
        return ReasoningSplit(reasoning=text[start:].strip(), answer="", closed=False)
    return ReasoningSplit(
        reasoning=text[start:close_at].strip(),
        answer=text[close_at + len(THINK_CLOSE):].strip(),
        closed=True,
    )


# --- the R1 special tokens --------------------------------------------------------------------
# Full-width vertical bar (U+FF5C) and lower one-eighth block (U+2581), as in DeepSeek's vocabularies.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
# Control tokens (skipped by decode(skip_special_tokens=True)). <think> and </think> are added tokens
# too, but not "special": DeepSeek's tokenizers mark them special=False so that a decoded completion
# keeps its thinking tags and split_reasoning can still find them.
CONTROL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
SPECIAL_TOKENS = CONTROL_TOKENS + (THINK_OPEN, THINK_CLOSE)

# --- templates ----------------------------------------------------------------------------------
# r1kit's own R1 chat template. For conversations of system/user/assistant messages it renders
# byte for byte what DeepSeek's R1-Distill template renders (tests check it against that file through
# transformers): the system text right after bos, user turns after <｜User｜>, earlier assistant turns
# cut to the text after their last </think>, and a generation prompt that opens the thinking.
# Tool calls are not part of r1kit's format, so they are refused by name instead of rendered wrongly.
R1_CHAT_TEMPLATE = """\
{#- r1kit's R1 chat template: renders what DeepSeek's R1-Distill template renders for these roles -#}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}{%- endif -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<｜User｜>' + message['content'] -}}
    {%- elif message['role'] == 'assistant' -%}
        {#- earlier turns keep only their answer: the text after the last </think> -#}
        {%- set content = message['content'] -%}
        {%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}
        {{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}
    {%- elif message['role'] != 'system' -%}
        {{- raise_exception('r1kit R1 template: unsupported role ' + message['role'] + ' (use system, user or assistant)') -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<｜Assistant｜><think>\\n' -}}
{%- endif -%}
"""

# The R1-Zero training template (R1 report, Table 1), verbatim. Not a chat template: a plain
# prompt for base models, completed right after "Assistant:".
R1ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
    "answer here </answer>. User: {prompt}. Assistant:"
)


def r1zero_prompt(question: str) -> str:
    """The R1-Zero prompt for one question (str.replace, so braces in the question are safe)."""
    return R1ZERO_TEMPLATE.replace("{prompt}", question)


def r1_prompt(tokenizer: "Tokenizer", question: str, system: str | None = None) -> str:
    """A one-turn R1 chat prompt ending in the generation prompt `<｜Assistant｜><think>\\n`."""
    messages = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, chat_template=tokenizer.chat_template or R1_CHAT_TEMPLATE
    )


@lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """Compile a chat template in the environment transformers uses, so templates render the same.

    Chat templates ship inside downloaded checkpoints, so they are untrusted code: a sandboxed,
    immutable environment. trim_blocks/lstrip_blocks, `raise_exception`, a `tojson` that does not
    HTML-escape, and the loopcontrols extension are what Hub templates are written against.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    """Render a Hugging Face chat template (Jinja) for a list of {"role", "content"} messages."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content', got {message!r}")
    compiled = _compile_chat_template(template)
    return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables)


# --- the tokenizer ------------------------------------------------------------------------------
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json holds special tokens as plain strings or as AddedToken dicts (DeepSeek's)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or a dict with 'content', got {value!r}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-save or re-download the tokenizer") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class Tokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json) plus what tokenizer_config.json adds to it:
    the special token strings and the chat template. Reads and writes the same files transformers
    does, without needing transformers."""

    def __init__(
        self,
        backend,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        config: dict | None = None,
    ):
        self.backend = backend  # tokenizers.Tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.config = dict(config or {})  # other tokenizer_config.json keys, kept on save

    # loading and saving
    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        folder = Path(path)
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            what = "folder does not exist" if not folder.exists() else f"no {TOKENIZER_FILE} in it"
            raise FileNotFoundError(
                f"{folder}: {what}; expected a Hugging Face tokenizer folder with {TOKENIZER_FILE} "
                f"(and {TOKENIZER_CONFIG_FILE}), e.g. a checkpoint saved by r1kit or transformers"
            )
        text = tokenizer_file.read_text(encoding="utf-8")
        _ = _read_json(tokenizer_file)  # a clear error for truncated or corrupt JSON
        try:
            backend = Backend.from_str(text)
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(f"{tokenizer_file} is not a valid tokenizers file ({err})") from err
        config_file = folder / TOKENIZER_CONFIG_FILE
        config = _read_json(config_file) if config_file.is_file() else {}
        chat_template = config.pop("chat_template", None)
        if isinstance(chat_template, list):  # several named templates: use the default one
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default")
        template_file = folder / CHAT_TEMPLATE_FILE
        if template_file.is_file():  # transformers 5 writes it there, and it wins over the config's
            chat_template = template_file.read_text(encoding="utf-8")
        return cls(
            backend,
            bos_token=_token_content(config.pop("bos_token", None)),
            eos_token=_token_content(config.pop("eos_token", None)),
            pad_token=_token_content(config.pop("pad_token", None)),
            chat_template=chat_template,
            add_bos_token=bool(config.pop("add_bos_token", False)),
            config=config,
        )

    def save(self, folder: str | os.PathLike) -> Path:
        from r1kit.checkpoint import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config}
        config.update(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token)
        config["add_bos_token"] = self.add_bos_token
        config["add_eos_token"] = config.get("add_eos_token", False)
        config.setdefault("clean_up_tokenization_spaces", False)
        if self.chat_template is not None:
            # both places: older transformers and DeepSeek's checkpoints read the config, 5.x the file
            config["chat_template"] = self.chat_template
        atomic_write_text(folder / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        atomic_write_text(folder / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.chat_template is not None:
            atomic_write_text(folder / CHAT_TEMPLATE_FILE, self.chat_template)
        return folder

    # ids and text
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._maybe_add_bos(ids) if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        return [self._maybe_add_bos(i) for i in ids] if add_special_tokens else ids

    def _maybe_add_bos(self, ids: list[int]) -> list[int]:
        # A tokenizer.json post-processor decides the special tokens (DeepSeek's and ours add bos);
        # only without one does add_bos_token from tokenizer_config.json apply, as in transformers.
        bos = self.bos_token_id
        if self.backend.post_processor is None and self.add_bos_token and bos is not None:
            return [bos] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        pad = None if self.pad_token is None else self.token_to_id(self.pad_token)
        return self.eos_token_id if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # chat
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **variables,
    ) -> str | list[int]:
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this tokenizer has no chat template: add 'chat_template' to tokenizer_config.json "
                "(or a chat_template.jinja file), or pass chat_template=r1kit.tokenizer.R1_CHAT_TEMPLATE"
            )
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self.pad_token or "", **variables}
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)
        # the template writes bos itself, so the text is encoded without adding special tokens
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


class IncrementalDecoder:
    """Turns ids arriving one at a time into text deltas whose concatenation equals decode(all ids).

    A token may end inside a multi-byte character (byte-level BPE), and some decoders change a
    token's text depending on its left neighbour, so each step decodes a short window of recent ids
    and emits only the new text, holding it back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: context for the decoder
        self.read_offset = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd") and text.startswith(prefix_text):
            delta = text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return delta
        return ""

    def __call__(self, token_id: int) -> str:
        return self.step(token_id)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix_text):] if text.startswith(prefix_text) else text

    def decode_all(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty deltas for a whole id stream, then the flushed rest."""
        for token_id in ids:
            delta = self.step(token_id)
            if delta:
                yield delta
        rest = self.flush()
        if rest:
            yield rest


# --- training small tokenizers offline -----------------------------------------------------------
# Qwen2's pre-tokenizer regex: words, single digits (\p{N} alone, so numbers are never merged into
# multi-digit tokens), punctuation runs and whitespace. Using this exact pattern means a GGUF export
# can name it ("qwen2") and llama.cpp splits text exactly as we do.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAR_VOCAB_MAX = 512  # at or below this vocab_size a BPE gets too few merges to help: use "char"


def _byte_level_backend(vocab: dict[str, int] | None = None, merges: list | None = None):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE(vocab=vocab, merges=merges) if vocab is not None else models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


def train_tokenizer(texts: Iterable[str], vocab_size: int | None = None, kind: str | None = None) -> Tokenizer:
    """Train a byte-level tokenizer offline, with the R1 special tokens and r1kit's R1 chat template.

    kind="char": one token per byte (so one per ASCII character and per digit) and no merges: the
        vocabulary is the 256 bytes plus the special tokens, whatever `texts` hold. Tiny models on
        synthetic arithmetic learn far better with it. The default when vocab_size is None or small.
    kind="bpe": byte-level BPE trained on `texts` up to vocab_size tokens in all (special included).
    Either way any text round-trips: decode(encode(x)) == x.
    """
    from tokenizers import AddedToken, pre_tokenizers, processors, trainers

    if kind is None:
        kind = "char" if vocab_size is None or vocab_size <= CHAR_VOCAB_MAX else "bpe"
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    if kind == "char":
        vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet, key=_byte_of))}
        backend = _byte_level_backend(vocab, [])
    elif kind == "bpe":
        minimum = len(alphabet) + len(SPECIAL_TOKENS)
        if vocab_size is None or vocab_size < minimum:
            raise ValueError(f"train_tokenizer(kind='bpe') needs vocab_size >= {minimum} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}; or use kind='char'")
        backend = _byte_level_backend()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS), initial_alphabet=alphabet,
            min_frequency=2, show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; use 'char' or 'bpe'")
    # special tokens go after the learned vocabulary, as in DeepSeek's tokenizers
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    # encode(text, add_special_tokens=True) prepends bos, written the way transformers writes it
    bos = (BOS_TOKEN, backend.token_to_id(BOS_TOKEN))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1", special_tokens=[bos]
    )
    return Tokenizer(
        backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        chat_template=R1_CHAT_TEMPLATE, add_bos_token=True,
        config={"model_max_length": 1 << 20, "r1kit_tokenizer_kind": kind},
    )


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's byte <-> printable character table, so the "char" vocabulary is ordered by byte value
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _byte_of(symbol: str) -> int:
    return _unicode_to_byte()[symbol]
