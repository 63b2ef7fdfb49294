"""Build a model's tokenizer from a GGUF file's metadata alone (no tokenizer.json, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from engine.tokenizer import Tokenizer, install_post_processor, read_template_override

__all__ = [
    "PRE_TOKENIZERS",
    "GGUFTokenizerError",
    "PreTokenizerSpec",
    "backend_from_gguf",
    "tokenizer_from_gguf",
]


class GGUFTokenizerError(ValueError):
    """The GGUF describes no tokenizer, or one of a kind not supported here; the message is one line."""


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` type prepares text for BPE, after llama.cpp's llama-vocab.cpp.

    Each regex in `splits` is applied in turn to every piece so far, isolating its matches (the
    text between matches stays a piece too), as llama.cpp's unicode_regex_split does.
    """

    splits: tuple[str, ...]
    # NOTE: a normalizer the upstream tokenizer.json has but the GGUF does not record.
    normalizer: str | None = None
    ignore_merges: bool = False  # a piece that is itself a token is taken whole
    add_bos: bool = False  # when the GGUF has no tokenizer.ggml.add_bos_token


# The tokenizers library's own ByteLevel split (GPT-2's, plus a final `\s+` that changes nothing
# when gaps between matches are kept as pieces).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = PreTokenizerSpec((r"\p{N}", _GPT2))  # StarCoder-style: every digit alone
_LLAMA3_PRE = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "gpt-2": PreTokenizerSpec((_GPT2,)),
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "codeshell": _DIGITS_THEN_GPT2,
    "smollm": _DIGITS_THEN_GPT2,
    "qwen2": PreTokenizerSpec((_QWEN2,), normalizer="NFC"),
    "llama3": _LLAMA3_PRE,
    "llama-v3": _LLAMA3_PRE,
    "llama-bpe": _LLAMA3_PRE,
}

_NORMALIZERS = {"NFC": normalizers.NFC}

# Special token names as engine.tokenizer.Tokenizer takes them -> GGUF id keys.
_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# Ids that end a turn besides eos (Llama 3's <|eot_id|>, <|eom_id|>); absent from most files.
_EXTRA_EOS_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def backend_from_gguf(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` a GGUF's `tokenizer.*` metadata describes (byte-level BPE, or
    SentencePiece BPE).

    Control tokens become special added tokens and user-defined ones plain added tokens, both
    matched whole in text; the post-processor adds BOS/EOS as `tokenizer.ggml.add_*_token` say.
    """
    model_type = _get(reader, "tokenizer.ggml.model")
    if model_type == "llama":
        return _sentencepiece_backend(reader)
    if model_type != "gpt2":
        raise GGUFTokenizerError(
            f"unsupported GGUF tokenizer model tokenizer.ggml.model={model_type!r}; "
            "supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"
        )
    pre_type = _get(reader, "tokenizer.ggml.pre")
    pre = PRE_TOKENIZERS.get(pre_type)
    if pre is None:
        raise GGUFTokenizerError(
            f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre_type!r}; "
            f"supported: {', '.join(PRE_TOKENIZERS)}"
        )
    tokens: list[str] = _require(reader, "tokenizer.ggml.tokens")
    # A vocabulary of single bytes needs no merges (GGUFWriter drops an empty list).
    merges: list[str] = _get(reader, "tokenizer.ggml.merges") or []
    token_types: list[int] = _get(reader, "tokenizer.ggml.token_type") or []

    # NOTE: every token goes into the BPE vocabulary (unused padding ones too), so ids are the
    # file's; the added tokens below then take the ids their strings already have.
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFTokenizerError("the GGUF's tokenizer.ggml.tokens has duplicate tokens")
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            # Byte-level tokens spell a space as "Ġ", so the one space separates the pair.
            merges=[tuple(merge.split(" ", 1)) for merge in merges],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=pre.ignore_merges,
        )
    )
    _add_typed_tokens(backend, tokens, token_types)
    if pre.normalizer is not None:
        backend.normalizer = _NORMALIZERS[pre.normalizer]()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    _install_bos_eos(backend, reader, add_bos_by_default=pre.add_bos)
    return backend


def _sentencepiece_backend(reader: gguf.GGUFReader) -> tokenizers.Tokenizer:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama: `tokenizer.ggml.model` =
    "llama"), as transformers' LlamaTokenizer builds it: spaces as "▁" and one before the text,
    the merges SentencePiece's scores imply, bytes outside the vocabulary as <0xNN> tokens."""
    tokens: list[str] = _require(reader, "tokenizer.ggml.tokens")
    scores: list[float] = _require(reader, "tokenizer.ggml.scores")
    token_types: list[int] = _get(reader, "tokenizer.ggml.token_type") or []
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(scores) != len(tokens):
        raise GGUFTokenizerError("the GGUF's tokenizer.ggml.tokens has duplicates, or not one score per token")
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=_sentencepiece_merges(tokens, scores, vocab), fuse_unk=True, byte_fallback=True)
    )
    _add_typed_tokens(backend, tokens, token_types)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    _install_bos_eos(backend, reader, add_bos_by_default=True)  # llama.cpp's default for these
    return backend


def _sentencepiece_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE joins the adjacent pair whose joined piece scores highest. As ranked BPE
    merges: every way to cut each piece into two pieces of the vocabulary, ranked by the whole
    piece's score, highest first (ties by the two pieces' ids)."""
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right]))
    ranked.sort()
    return [(tokens[left], tokens[right]) for _, left, right in ranked]


def _add_typed_tokens(backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens."""
    typed = list(zip(tokens, token_types))
    backend.add_special_tokens([_added(t, special=True) for t, kind in typed if kind == gguf.TokenType.CONTROL])
    backend.add_tokens([_added(t, special=False) for t, kind in typed if kind == gguf.TokenType.USER_DEFINED])


def _install_bos_eos(backend: tokenizers.Tokenizer, reader: gguf.GGUFReader, add_bos_by_default: bool) -> None:
    add_bos = _get(reader, "tokenizer.ggml.add_bos_token")
    add_eos = _get(reader, "tokenizer.ggml.add_eos_token")
    specials = _special_tokens(reader)
    install_post_processor(
        backend,
        bos=specials["bos_token"] if (add_bos_by_default if add_bos is None else add_bos) else None,
        eos=specials["eos_token"] if add_eos else None,
    )


def tokenizer_from_gguf(
    source: str | Path | gguf.GGUFReader,
    chat_template: str | Path | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> Tokenizer:
    """An engine Tokenizer from a GGUF file (or an open reader, so the weights can share it).

    `chat_template` overrides the file's (a path or the template text); `eos_token_ids`, where
    given, replaces the stop ids the file names (the catalogue's upstream ones)."""
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    templates = _chat_templates(reader)
    if chat_template is not None:
        templates = {"default": read_template_override(chat_template)}
    generation_config = _generation_config(reader)
    if eos_token_ids:
        generation_config["eos_token_id"] = list(eos_token_ids)
    return Tokenizer(
        backend_from_gguf(reader),
        special_tokens=_special_tokens(reader),
        chat_templates=templates,
        generation_config=generation_config,
    )


# ---- metadata ------------------------------------------------------------------------------


def _get(reader: gguf.GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _require(reader: gguf.GGUFReader, key: str) -> Any:
    value = _get(reader, key)
    if value is None:
        raise GGUFTokenizerError(f"the GGUF has no {key}")
    return value


def _token_id(reader: gguf.GGUFReader, key: str) -> int | None:
    token_id = _get(reader, key)
    num_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    # llama.cpp ignores an out-of-range id the same way.
    return token_id if token_id is not None and 0 <= token_id < num_tokens else None


def _special_tokens(reader: gguf.GGUFReader) -> dict[str, str | None]:
    """bos/eos/unk/pad token strings, as engine.tokenizer.Tokenizer takes them."""
    tokens = reader.fields["tokenizer.ggml.tokens"]
    ids = {name: _token_id(reader, key) for name, key in _SPECIAL_TOKEN_KEYS.items()}
    return {name: None if i is None else tokens.contents(i) for name, i in ids.items()}


def _generation_config(reader: gguf.GGUFReader) -> dict[str, Any]:
    """What a generation_config.json would hold that the GGUF can say: special ids, no sampling."""
    eos_ids = [_token_id(reader, k) for k in (_SPECIAL_TOKEN_KEYS["eos_token"], *_EXTRA_EOS_KEYS)]
    config = {
        "bos_token_id": _token_id(reader, _SPECIAL_TOKEN_KEYS["bos_token"]),
        "eos_token_id": list(dict.fromkeys(i for i in eos_ids if i is not None)) or None,
        "pad_token_id": _token_id(reader, _SPECIAL_TOKEN_KEYS["pad_token"]),
    }
    return {key: value for key, value in config.items() if value is not None}


def _chat_templates(reader: gguf.GGUFReader) -> dict[str, str]:
    """`tokenizer.chat_template` as "default", `tokenizer.chat_template.<name>` as <name>."""
    templates = {}
    for key in reader.fields:
        if key == _CHAT_TEMPLATE_KEY:
            templates["default"] = _get(reader, key)
        elif key.startswith(_CHAT_TEMPLATE_KEY + "."):
            templates[key.removeprefix(_CHAT_TEMPLATE_KEY + ".")] = _get(reader, key)
    return {name: text for name, text in templates.items() if isinstance(text, str)}


# ---- building blocks -----------------------------------------------------------------------


def _added(content: str, *, special: bool) -> AddedToken:
    # normalized=False: matched in the raw text, as llama.cpp matches them before anything else.
    return AddedToken(content, special=special, normalized=False)
