"""Tokenizer, chat templates and the reasoning splitter."""
from __future__ import annotations

import json
import random

import pytest

from r1kit.paths import templates_dir
from r1kit.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    R1_CHAT_TEMPLATE,
    R1ZERO_TEMPLATE,
    SPECIAL_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    USER_TOKEN,
    IncrementalDecoder,
    Tokenizer,
    r1_prompt,
    r1zero_prompt,
    render_chat_template,
    split_reasoning,
    train_tokenizer,
)

CORPUS = [
    f"Question {i}: what is {i * 37} + {i * 11}?\nLet me think step by step. The answer is {i * 48}.\n"
    for i in range(400)
] + ["Ünïcödé text: 数学 и физика, emoji 😀🎉, tabs\tand  double  spaces.\n"] * 5

SAMPLES = [
    "12+34=46",
    "The answer is 12345.\n\n  indented\tand\ttabbed  \n",
    "  leading and trailing spaces  ",
    "mixed <think>reasoning</think> answer",
    "",
    "\n",
    "Ünïcödé 数学 😀 done",
]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, vocab_size=400, kind="bpe")


@pytest.fixture(scope="module")
def char():
    return train_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def deepseek_template():
    return (templates_dir() / "deepseek-r1-distill.jinja").read_text(encoding="utf-8")


# --- training and round trips ---------------------------------------------------------------------
def test_default_kind_is_char_with_one_token_per_ascii_character(char):
    assert char.config["r1kit_tokenizer_kind"] == "char"
    assert char.vocab_size == 256 + len(SPECIAL_TOKENS)
    text = "Compute 907+18 = 925.\n"
    ids = char.encode(text)
    assert len(ids) == len(text)
    assert ids == list(text.encode())  # ids are byte values


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip(kind, bpe, char):
    tok = bpe if kind == "bpe" else char
    for text in SAMPLES + CORPUS[:20]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_bpe_learns_merges_but_digits_stay_single_tokens(bpe):
    assert bpe.config["r1kit_tokenizer_kind"] == "bpe"
    assert 256 + len(SPECIAL_TOKENS) < bpe.vocab_size <= 400
    assert len(bpe.encode("Question")) < len("Question")  # merges were learned
    for number in ["12345", "907", "0", " 48", "x=2024"]:
        ids = bpe.encode(number)
        digit_pieces = [bpe.decode([i]) for i in ids if any(c.isdigit() for c in bpe.decode([i]))]
        assert all(len(p.strip()) == 1 for p in digit_pieces), (number, digit_pieces)


def test_special_tokens_are_single_ids(bpe):
    for token in SPECIAL_TOKENS:
        token_id = bpe.token_to_id(token)
        assert token_id is not None and bpe.encode(token) == [token_id]
    assert bpe.bos_token_id == bpe.token_to_id(BOS_TOKEN)
    assert bpe.eos_token_id == bpe.token_to_id(EOS_TOKEN)
    assert bpe.pad_token_id == bpe.eos_token_id
    # control tokens vanish with skip_special_tokens; the thinking tags stay for split_reasoning
    ids = bpe.encode(f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}{THINK_OPEN}x{THINK_CLOSE}y{EOS_TOKEN}")
    assert bpe.decode(ids, skip_special_tokens=True) == "hi<think>x</think>y"
    assert bpe.encode("hi", add_special_tokens=True) == [bpe.bos_token_id] + bpe.encode("hi")


def test_special_token_constants_use_full_width_characters():
    assert BOS_TOKEN == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert EOS_TOKEN == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert USER_TOKEN == "<\uff5cUser\uff5c>" and ASSISTANT_TOKEN == "<\uff5cAssistant\uff5c>"


def test_pad_falls_back_to_eos(bpe):
    tok = Tokenizer(bpe.backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=None)
    assert tok.pad_token_id == tok.eos_token_id


# --- save / load ----------------------------------------------------------------------------------
def test_save_writes_both_template_locations_and_loads_back(bpe, tmp_path):
    bpe.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == R1_CHAT_TEMPLATE
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == R1_CHAT_TEMPLATE and config["bos_token"] == BOS_TOKEN
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.chat_template == R1_CHAT_TEMPLATE
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.vocab_size) == (bpe.bos_token_id, bpe.eos_token_id, bpe.vocab_size)
    for text in SAMPLES:
        assert loaded.encode(text) == bpe.encode(text)
        assert loaded.encode(text, add_special_tokens=True) == bpe.encode(text, add_special_tokens=True)


def test_load_deepseek_style_config(bpe, tmp_path, deepseek_template):
    # DeepSeek's checkpoints: template only inside tokenizer_config.json, tokens as AddedToken dicts
    (tmp_path / "tokenizer.json").write_text(bpe.backend.to_str(), encoding="utf-8")
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS_TOKEN), "eos_token": added(EOS_TOKEN),
              "pad_token": added(EOS_TOKEN), "chat_template": deepseek_template, "model_max_length": 16384}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.chat_template == deepseek_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, EOS_TOKEN)
    assert tok.add_bos_token is True and tok.config["model_max_length"] == 16384


def test_loads_what_transformers_saves_and_transformers_loads_ours(bpe, tmp_path, deepseek_template):
    from transformers import AutoTokenizer

    bpe.save(tmp_path / "ours")
    hf = AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert hf.bos_token == BOS_TOKEN and hf.eos_token == EOS_TOKEN and hf.chat_template == R1_CHAT_TEMPLATE
    for text in SAMPLES:
        assert hf(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
        assert hf(text)["input_ids"] == bpe.encode(text, add_special_tokens=True)
    hf.chat_template = deepseek_template
    hf.save_pretrained(tmp_path / "theirs")  # transformers 5 writes the template to chat_template.jinja
    theirs = Tokenizer.from_folder(tmp_path / "theirs")
    assert theirs.chat_template == deepseek_template
    assert theirs.encode(SAMPLES[1]) == bpe.encode(SAMPLES[1])


# --- chat templates -------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a careful solver."}, {"role": "user", "content": "Solve x+1=3."}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "first system"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "plain answer, no thinking"},
        {"role": "system", "content": "second system"},
        {"role": "user", "content": "Q2 with {braces} and\nnewlines"},
        {"role": "assistant", "content": "partial</think>middle</think>  last part"},
    ],
    [
        {"role": "user", "content": "Ünïcödé 数学?"},
        {"role": "assistant", "content": "reasoning only opened by the prompt\n</think>\n\n\\boxed{7}"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_r1_template_matches_deepseek_template_in_transformers(bpe, tmp_path, deepseek_template, conversation, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    bpe.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    hf.chat_template = deepseek_template
    expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = bpe.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert ours == expected
    # and our renderer gives the same result with DeepSeek's own file
    assert bpe.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, chat_template=deepseek_template) == expected
    assert bpe.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True) == bpe.encode(expected)


def test_generation_prompt_opens_the_thinking(bpe):
    prompt = r1_prompt(bpe, "What is 6*7?")
    assert prompt == f"{BOS_TOKEN}{USER_TOKEN}What is 6*7?{ASSISTANT_TOKEN}<think>\n"
    assert prompt.endswith("<think>\n")
    with_system = r1_prompt(bpe, "Q", system="S")
    assert with_system.startswith(f"{BOS_TOKEN}S{USER_TOKEN}Q")


def test_renderer_environment_matches_transformers(bpe, tmp_path):
    """tojson (no HTML escaping), loopcontrols, trim/lstrip blocks, raise_exception, as in transformers."""
    from jinja2.exceptions import TemplateError
    from transformers import PreTrainedTokenizerFast

    template = (
        "{% for m in messages %}\n"
        "  {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
        "{{ m | tojson }}|{{ m['content'] | tojson(indent=2) }}\n"
        "  {% if loop.index > 3 %}{% break %}{% endif %}\n"
        "{% endfor %}{{ bos_token }}{{ eos_token }}"
        "{% if add_generation_prompt %}<gen>{% endif %}"
    )
    messages = [{"role": "user", "content": "<a & 'b'> é"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "2"}, {"role": "user", "content": "3"}]
    bpe.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    hf.chat_template = template
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert bpe.apply_chat_template(messages, chat_template=template) == expected
    with pytest.raises(TemplateError, match="unsupported role tool"):
        bpe.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="must be a dict"):
        render_chat_template(R1_CHAT_TEMPLATE, ["not a message"])


def test_sandbox_blocks_unsafe_templates():
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])


def test_missing_template_is_a_clear_error(bpe):
    tok = Tokenizer(bpe.backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert r1_prompt(tok, "hi").endswith("<think>\n")  # r1_prompt falls back to r1kit's template


def test_r1zero_prompt():
    prompt = r1zero_prompt("Using the numbers [3, 5, 7], make 22 {exactly}")
    assert prompt.startswith("A conversation between User and Assistant. The user asks a question, and the Assistant solves it.")
    assert "i.e., <think> reasoning process here </think> <answer> answer here </answer>." in prompt
    assert prompt.endswith("User: Using the numbers [3, 5, 7], make 22 {exactly}. Assistant:")
    assert R1ZERO_TEMPLATE.count("{prompt}") == 1 and "\n" not in R1ZERO_TEMPLATE


# --- incremental decoding -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_incremental_decoder_equals_full_decode(kind, bpe, char):
    tok = bpe if kind == "bpe" else char
    texts = SAMPLES + ["数学😀🎉é" * 3, f"{THINK_OPEN}thinking 😀{THINK_CLOSE}\n\nanswer{EOS_TOKEN}"]
    for text in texts:
        ids = tok.encode(text)
        for skip in (False, True):
            decoder = tok.decode_stream(skip_special_tokens=skip)
            deltas = [decoder.step(i) for i in ids] + [decoder.flush()]
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)  # never a half character on screen
    # a multi-byte character split over tokens is held back until complete
    decoder = IncrementalDecoder(char)
    emoji = char.encode("😀")
    assert len(emoji) == 4 and [decoder.step(i) for i in emoji] == ["", "", "", "😀"]


def test_incremental_decoder_random_ids_and_truncated_characters(char, bpe):
    rng = random.Random(0)
    for tok in (char, bpe):
        for _ in range(30):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
            decoder = tok.decode_stream()
            assert "".join(decoder.decode_all(ids)) == tok.decode(ids)


# --- errors ---------------------------------------------------------------------------------------
def test_missing_and_corrupt_files(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text(bpe.backend.to_str()[:500], encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100, kind="bpe")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(CORPUS, kind="wordpiece")


# --- split_reasoning ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, opened, reasoning, answer, closed",
    [
        ("<think>\nstep\n</think>\n\n42", None, "step", "42", True),  # full thinking block
        ("  \n<think>a</think>b", None, "a", "b", True),  # whitespace before <think>
        ("step one\n</think>\n\nThe answer is 4", None, "step one", "The answer is 4", True),  # R1 prompt opened it
        ("step one\n</think>\n\nThe answer is 4", True, "step one", "The answer is 4", True),
        ("still thinking when cut", True, "still thinking when cut", "", False),  # truncated inside thinking
        ("<think>truncated", None, "truncated", "", False),
        ("just an answer", None, None, "just an answer", False),  # no thinking at all
        ("Answer first <think>x</think> y", None, None, "Answer first <think>x</think> y", False),
        ("x</think>y", False, None, "x</think>y", False),  # caller says the prompt did not open it
        ("<think>a</think>b</think>c", None, "a", "b</think>c", True),  # only the first close counts
        ("a</think>b<think>c</think>d", None, "a", "b<think>c</think>d", True),
        ("<think></think>", None, "", "", True),
        ("", None, None, "", False),
        ("", True, "", "", False),
    ],
)
def test_split_reasoning(completion, opened, reasoning, answer, closed):
    split = split_reasoning(completion, prompt_opened_think=opened)
    assert (split.reasoning, split.answer, split.closed) == (reasoning, answer, closed)


def test_split_reasoning_of_a_rendered_r1_turn(bpe):
    prompt = r1_prompt(bpe, "2+2?")
    completion = "Two plus two.\n</think>\n\n**4**"
    split = split_reasoning(completion, prompt_opened_think=prompt.endswith("<think>\n"))
    assert split == split_reasoning(completion)
    assert (split.reasoning, split.answer, split.closed) == ("Two plus two.", "**4**", True)
