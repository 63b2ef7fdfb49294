"""engine.tokenizer against transformers on the real default models, plus streaming invariants."""

from __future__ import annotations

import datetime
import functools
import json
import random
from pathlib import Path

import pytest

from engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.slow  # real or tiny model weights, kernel builds or servers

REPLACEMENT_CHAR = "\ufffd"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    import engine.assets

    return engine.assets.resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    import engine.assets

    return engine.assets.resolve_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session", params=["smollm2", "qwen"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


@functools.cache
def load_ours(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


@functools.cache
def load_hf(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


SAMPLE = (
    "Hello, world! The quick brown fox jumps over the lazy dog.\n"
    "中文：你好，世界。生僻字：齉龘靐𠀋𪚥。\n"
    "日本語：こんにちは、世界！カタカナとひらがな。\n"
    "Русский: Съешь же ещё этих мягких французских булок.\n"
    "العربية: مرحبا بالعالم\n"
    "Emoji: 😀 👍🏽 🧑‍🚀 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇺🇸 ❤️\n"
    "def fib(n: int) -> int:\n"
    "\tif n < 2:\n"
    "\t\treturn n\n"
    "    return fib(n - 1) + fib(n - 2)  # 4-space indent\n"
    "\n\n   trailing spaces   \n"
    "Special text: <|im_start|>user\nhi<|im_end|> <|endoftext|> <tool_call>{}</tool_call>\n"
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a place, e.g. Zürich or 東京.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "object",
                    "description": "Where to look",
                    "properties": {
                        "city": {"type": "string"},
                        "country": {"type": "string", "enum": ["CH", "JP", "US"]},
                        "coords": {
                            "type": "array",
                            "items": {"type": "number"},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                    },
                    "required": ["city"],
                },
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    },
}

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse. Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan? 日本の首都は？ 🗾"},
    ],
}


# -- chat templates -------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    model_dir: Path, conversation: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[conversation]
    expected = load_hf(model_dir).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = load_ours(model_dir)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
        expected
    )


def test_encode_chat_matches_transformers(model_dir: Path) -> None:
    messages = CONVERSATIONS["system_multi_turn"]
    expected = load_hf(model_dir).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True
    )
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert load_ours(model_dir).encode_chat(messages) == list(expected)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_tools_template_matches_transformers(
    qwen_dir: Path, add_generation_prompt: bool
) -> None:
    messages = [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": {"location": {"city": "Zürich", "country": "CH"}},
                    },
                }
            ],
        },
        {"role": "tool", "content": '{"temperature": 21, "sky": "☀️"}'},
        {"role": "assistant", "content": "It is 21 °C and sunny."},
    ]
    if add_generation_prompt:
        messages = messages + [{"role": "user", "content": "And in 東京?"}]
    expected = load_hf(qwen_dir).apply_chat_template(
        messages, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = load_ours(qwen_dir).apply_chat_template(
        messages, tools=[WEATHER_TOOL], add_generation_prompt=add_generation_prompt
    )
    assert ours == expected
    assert '"enum": ["CH", "JP", "US"]' in ours  # tojson: key order kept, non-ASCII kept
    assert "Zürich or 東京" in ours


def _bare_model_dir(src: Path, dst: Path, tokenizer_config: dict | None = None) -> Path:
    """A copy of src's tokenizer.json with a chosen tokenizer_config.json and no template file."""
    dst.mkdir()
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config.update(tokenizer_config or {})
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dst


def test_template_override_file_is_used(smollm2_dir: Path, tmp_path: Path) -> None:
    template_file = tmp_path / "custom.jinja"
    template_file.write_text(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}",
        encoding="utf-8",
    )
    for override in (template_file, str(template_file)):
        tok = Tokenizer.from_pretrained(smollm2_dir, chat_template=override)
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
        assert text == "[user] hi\n[assistant]"
        assert tok.chat_template == template_file.read_text(encoding="utf-8")


def test_template_override_text_and_missing_file(smollm2_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(
        smollm2_dir, chat_template="{{ bos_token }}{{ messages[0].content }}"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"
    with pytest.raises(ChatTemplateError, match="not found"):
        Tokenizer.from_pretrained(smollm2_dir, chat_template=str(tmp_path / "nope.jinja"))


def test_raise_exception_gives_chat_template_error(smollm2_dir: Path) -> None:
    template = (
        "{% if messages[0].role != 'system' %}"
        "{{ raise_exception('first message must be system, got ' + messages[0].role) }}"
        "{% endif %}ok"
    )
    tok = Tokenizer.from_pretrained(smollm2_dir, chat_template=template)
    with pytest.raises(ChatTemplateError, match="^first message must be system, got user$"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.apply_chat_template([{"role": "system", "content": "s"}]) == "ok"


def test_render_and_syntax_errors_are_chat_template_errors(smollm2_dir: Path) -> None:
    broken = Tokenizer.from_pretrained(smollm2_dir, chat_template="{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    # smollm2's template concatenates content as a string; a list of parts cannot render.
    tok = load_ours(smollm2_dir)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_missing_template_gives_clear_error(smollm2_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(_bare_model_dir(smollm2_dir, tmp_path / "bare"))
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.encode("hi") == load_ours(smollm2_dir).encode("hi")  # plain text still works


def test_template_list_in_tokenizer_config_picks_default(smollm2_dir: Path, tmp_path: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS{{ tools | length }}"},
        {"name": "default", "template": "DEFAULT{{ messages | length }}"},
    ]
    model_dir = _bare_model_dir(smollm2_dir, tmp_path / "multi", {"chat_template": templates})
    tok = Tokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.chat_template == "DEFAULT{{ messages | length }}"
    assert tok.apply_chat_template(messages) == "DEFAULT1"
    assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL]) == "TOOLS1"


def test_template_helpers_and_variables(smollm2_dir: Path) -> None:
    template = (
        "{{ data | tojson }}¦{{ data | tojson(indent=2) }}¦{{ strftime_now('%Y') }}¦"
        "{{ eos_token }}¦{{ pad_token }}¦{{ unk_token }}¦{{ enable_thinking }}¦"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}¦"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }}¦{% generation %}gen{% endgeneration %}"
    )
    tok = Tokenizer.from_pretrained(smollm2_dir, chat_template=template)
    data = {"b": "Zürich <&>", "a": [1, 2.5, None, True]}
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], enable_thinking=False, data=data
    )
    year = str(datetime.datetime.now().year)
    assert text.split("¦") == [
        json.dumps(data, ensure_ascii=False),
        json.dumps(data, ensure_ascii=False, indent=2),
        year,
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
        "False",
        "01",
        "1",
        "gen",
    ]
    unsafe = Tokenizer.from_pretrained(
        smollm2_dir, chat_template="{% set ns = namespace(_x=1) %}{{ ns._x }}"
    )
    with pytest.raises(ChatTemplateError):
        unsafe.apply_chat_template([{"role": "user", "content": "hi"}])


# -- encode / decode ------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(model_dir: Path, add_special_tokens: bool) -> None:
    hf = load_hf(model_dir)
    ours = load_ours(model_dir)
    for text in (SAMPLE, "", " ", "hello", " leading space", SAMPLE.split("\n")[1]):
        assert ours.encode(text, add_special_tokens=add_special_tokens) == hf.encode(
            text, add_special_tokens=add_special_tokens
        )
    assert ours.encode(SAMPLE) == hf(SAMPLE)["input_ids"]


@pytest.mark.parametrize("name", ["smollm2", "qwen"])
def test_encode_non_nfc_text_matches_transformers(
    request: pytest.FixtureRequest, name: str
) -> None:
    model_dir = request.getfixturevalue(f"{name}_dir")
    text = "cafe\u0301 \u1100\u1161 A\u030a"  # decomposed é, 가, Å
    assert load_ours(model_dir).encode(text) == load_hf(model_dir).encode(text)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(model_dir: Path, skip_special_tokens: bool) -> None:
    hf = load_hf(model_dir)
    ours = load_ours(model_dir)
    ids = ours.encode(SAMPLE)
    assert ours.decode(ids, skip_special_tokens) == hf.decode(
        ids, skip_special_tokens=skip_special_tokens
    )
    if not skip_special_tokens:
        assert ours.decode(ids, skip_special_tokens=False) == SAMPLE
    rng = random.Random(0)
    for _ in range(20):  # arbitrary ids, including broken UTF-8 and special tokens
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert ours.decode(ids, skip_special_tokens) == hf.decode(
            ids, skip_special_tokens=skip_special_tokens
        )


def test_token_lookups_match_transformers(model_dir: Path) -> None:
    hf = load_hf(model_dir)
    ours = load_ours(model_dir)
    ids = ours.encode(SAMPLE)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])
    assert ours.token_to_id("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    assert ours.token_to_id("no such token, surely") is None
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert set(hf.all_special_ids) <= ours.all_special_ids
    specials_dropped = {i for i in range(ours.vocab_size) if i in ours.skip_special_ids}
    for i in specials_dropped:
        assert hf.decode([i], skip_special_tokens=True) == ""


def test_add_bos_token_applies_only_without_post_processor(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    flags = {"add_bos_token": True, "add_eos_token": True}
    model_dir = _bare_model_dir(smollm2_dir, tmp_path / "flags", flags)
    plain = load_ours(smollm2_dir).encode("hi there")
    assert (
        Tokenizer.from_pretrained(model_dir).encode("hi there") == plain
    )  # tokenizer.json decides
    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = None
    (model_dir / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.encode("hi there") == [tok.bos_token_id, *plain, tok.token_to_id("<|im_end|>")]
    assert tok.encode("hi there", add_special_tokens=False) == plain


def test_eos_token_ids_follow_generation_config(model_dir: Path) -> None:
    ours = load_ours(model_dir)
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    eos = generation_config["eos_token_id"]
    eos = [eos] if isinstance(eos, int) else eos
    assert ours.eos_token_ids[: len(eos)] == eos
    tokenizer_eos = load_hf(model_dir).eos_token_id
    assert ours.eos_token_ids == list(dict.fromkeys([*eos, tokenizer_eos]))


def test_qwen_stops_on_im_end(qwen_dir: Path) -> None:
    assert 151645 in load_ours(qwen_dir).eos_token_ids


# -- streaming detokenization ---------------------------------------------------------------

STREAM_TEXT = (
    "Sure! 这是一个测试：生僻字齉龘靐𠀋𪚥𰻞 and emoji 🧑‍🚀👨‍👩‍👧‍👦🏳️‍🌈🇯🇵🇺🇸👍🏽 mixed in.\n"
    "日本語のテキスト、そして Русский текст, العربية أيضاً.\n"
    "```python\ndef f(x):\n\treturn x * 2  # 😀\n```\n"
)


def stream(
    tok: Tokenizer, ids: list[int], chunk_sizes: list[int] | None = None, skip: bool = True
) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = []
    pos = 0
    sizes = iter(chunk_sizes or [])
    while pos < len(ids):
        n = next(sizes, 1)
        deltas.append(detok.step(ids[pos : pos + n]))
        pos += n
    return deltas, detok.flush(), detok


def stream_ids(tok: Tokenizer) -> list[int]:
    ids = tok.encode(STREAM_TEXT * 8, add_special_tokens=False)[:200]
    assert len(ids) == 200
    return ids


def test_stream_ids_really_split_characters(model_dir: Path) -> None:
    tok = load_ours(model_dir)
    partial = [i for i in stream_ids(tok) if REPLACEMENT_CHAR in tok.decode([i])]
    assert len(partial) > 20  # byte-level BPE splits rare CJK and emoji across tokens


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_one_token_at_a_time(model_dir: Path, skip: bool) -> None:
    tok = load_ours(model_dir)
    ids = stream_ids(tok)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    for k in range(len(ids)):
        delta = detok.step([ids[k]])
        assert REPLACEMENT_CHAR not in delta
        # The text so far is everything decodable, holding back only an incomplete char.
        assert detok.text == tok.decode(ids[: k + 1], skip).rstrip(REPLACEMENT_CHAR)
    rest = detok.flush()
    assert detok.text == tok.decode(ids, skip)
    assert set(rest) <= {REPLACEMENT_CHAR}
    # flush() releases nothing after a clean end, and the U+FFFD of a truly cut char otherwise.
    ends_cut = [tok.decode(ids[:n]).endswith(REPLACEMENT_CHAR) for n in range(len(ids) + 1)]
    clean = max(n for n, is_cut in enumerate(ends_cut) if not is_cut)
    cut = max(n for n, is_cut in enumerate(ends_cut) if is_cut)
    deltas, rest, _ = stream(tok, ids[:clean], skip=skip)
    assert rest == "" and "".join(deltas) == tok.decode(ids[:clean], skip)
    deltas, rest, _ = stream(tok, ids[:cut], skip=skip)
    assert rest and set(rest) == {REPLACEMENT_CHAR}
    assert "".join(deltas) + rest == tok.decode(ids[:cut], skip)


@pytest.mark.parametrize("seed", range(5))
def test_detokenizer_random_chunks(model_dir: Path, seed: int) -> None:
    tok = load_ours(model_dir)
    ids = stream_ids(tok)
    rng = random.Random(seed)
    sizes = [rng.randint(1, 9) for _ in ids]
    deltas, rest, detok = stream(tok, ids, sizes)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) + rest == tok.decode(ids) == detok.text


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_special_tokens(model_dir: Path, skip: bool) -> None:
    tok = load_ours(model_dir)
    text = '<|im_start|>assistant\n Hi 👋<|im_end|><|endoftext|> <tool_call>{"a": 1}</tool_call>'
    ids = tok.encode(text, add_special_tokens=False)
    for prefix in ([], tok.encode("<|im_start|>", add_special_tokens=False)):
        deltas, rest, _ = stream(tok, prefix + ids, skip=skip)
        assert "".join(deltas) + rest == tok.decode(prefix + ids, skip)
    if not skip:
        assert "".join(deltas) + rest == "<|im_start|>" + text


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_random_ids(model_dir: Path, skip: bool) -> None:
    """Arbitrary ids (genuinely invalid UTF-8 included): the join still equals decode()."""
    tok = load_ours(model_dir)
    rng = random.Random(1)
    for _ in range(10):
        ids = [rng.randrange(tok.vocab_size) for _ in range(120)]
        sizes = [rng.randint(1, 4) for _ in ids]
        deltas, rest, _ = stream(tok, ids, sizes, skip=skip)
        assert "".join(deltas) + rest == tok.decode(ids, skip)


def test_detokenizer_matches_decode_of_completion_alone(model_dir: Path) -> None:
    tok = load_ours(model_dir)
    completion = tok.encode(" Hi there!", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.step([i]) for i in completion) + detok.flush() == tok.decode(completion)


def _sentencepiece_style_tokenizer() -> Tokenizer:
    """A tiny Llama-2-style pipeline: Metaspace, `<0xHH>` byte fallback, Strip decoder."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzH!,.", "▁h", "▁he", "ll", "llo", "▁w", "or"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("ll", "o"), ("▁", "w"), ("o", "r")]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def test_detokenizer_sentencepiece_byte_fallback() -> None:
    tok = _sentencepiece_style_tokenizer()
    assert len(tok.byte_fallback_ids) == 256
    text = "hello world, 中文 🧑‍🚀 and 𠀋 again hello " * 6
    ids = tok.encode(text)
    assert sum(i in tok.byte_fallback_ids for i in ids) > 100
    assert tok.decode(ids).startswith("hello")  # the first token's space is stripped
    for seed in range(5):
        rng = random.Random(seed)
        sizes = [1] * len(ids) if seed == 0 else [rng.randint(1, 6) for _ in ids]
        deltas, rest, _ = stream(tok, [1, *ids, 2], sizes)
        assert not any(REPLACEMENT_CHAR in d for d in deltas)
        assert "".join(deltas) + rest == tok.decode([1, *ids, 2])


def test_detokenizer_window_stays_short(model_dir: Path) -> None:
    tok = load_ours(model_dir)
    ids = tok.encode("word " * 500, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    for i in ids:
        detok.step([i])
        assert len(detok._window) <= IncrementalDetokenizer._MAX_WINDOW + 1
    assert detok.text == tok.decode(ids)
