"""Structured outputs: grammars compiled to per-token masks (llguidance), per-sequence matcher
state, and the masks applied to a step's logits.

    GrammarSpec --GrammarCompiler.compile (any thread, cached)--> CompiledGrammar
    CompiledGrammar.matcher() -> one GrammarMatcher per sequence (engine thread only):
        fill_bitmask(row) before each sample, accept(token) after it.

llguidance was chosen by benchmarks/grammar_engines.py: ~1 ms to compile a typical schema on
either vocabulary (xgrammar ~10-20 ms, outlines-core 0.2 s to minutes), masks computed lazily in
tens of microseconds, no dependencies, and unsupported JSON Schema keywords are errors rather than
silently ignored.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

NEG_INF = float("-inf")
GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]

# Whitespace the JSON grammars allow between tokens: bounded, so a model cannot loop on newlines.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"
# Resource limits of one grammar (llguidance's fuel: ~50k/ms to build, ~14k/ms per mask step).
MAX_BUILD_FUEL = 2_000_000
MAX_STEP_FUEL = 200_000
CACHE_SIZE = 256

# Bit j of byte b: 0.0 where set (the token is allowed), -inf where clear. [256, 8]
_BYTE_BIAS = torch.where(
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, NEG_INF
)
_BYTE_BIAS_NP = _BYTE_BIAS.numpy()


class GrammarError(ValueError):
    """A grammar that cannot be compiled: invalid, unsupported keywords, or too complex."""


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What an output must match. `text`: a JSON schema (serialized), a regex, a JSON list of
    strings (choice) or a Lark or GBNF grammar; unused for json_object. `whitespace`: the regex
    of whitespace allowed between JSON tokens (None: JSON_WHITESPACE, "": none).

    JSON Schema keywords the engine cannot enforce are errors, never silently ignored."""

    kind: GrammarKind
    text: str = ""
    whitespace: str | None = None


class GrammarMatcher:
    """One sequence's position in its grammar. Used only by the engine thread.

    `is_terminated`: nothing but end-of-sequence can follow, so the sequence is complete.
    `error`: why the matcher failed (a resource limit); it then allows only end-of-sequence.
    """

    __slots__ = ("_matcher",)

    def __init__(self, matcher: object) -> None:
        self._matcher = matcher

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (int32 [bitmask_words(vocab)], contiguous)."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, token_id: int) -> bool:
        return self._matcher.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None


class CompiledGrammar:
    """A grammar checked against one vocabulary; immutable, shared by the requests that use it.
    Each sequence gets its own matcher, a copy of a pristine one (~1 us)."""

    __slots__ = ("spec", "_pristine", "_lock")

    def __init__(self, spec: GrammarSpec, pristine: object) -> None:
        self.spec = spec
        self._pristine = pristine
        self._lock = threading.Lock()

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            return GrammarMatcher(self._pristine.deep_copy())

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.spec.kind}, {self.spec.text[:60]!r})"


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer and logits width; thread-safe, results cached.

    The tokenizer's preparation (~1-3 s on a 151k vocabulary) happens once, on first use or
    in `prepare()`.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (>= the tokenizer's vocabulary)
        self.eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()  # LRU

    def cached(self, spec: GrammarSpec) -> CompiledGrammar | None:
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
            return compiled

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of `spec` (cached); raises GrammarError. Errors are not cached."""
        compiled = self.cached(spec)
        if compiled is None:
            compiled = self._compile(spec)
            with self._lock:
                self._cache[spec] = compiled
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return compiled

    def prepare(self) -> None:
        """Build the tokenizer tables now (the first compile does it otherwise)."""
        self._llg_tokenizer()

    def _llg_tokenizer(self):
        with self._prepare_lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=self.eos_token_ids,
                )
            return self._ll_tokenizer

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        import llguidance

        grammar = _llguidance_grammar(spec)
        limits = llguidance.LLParserLimits(
            initial_lexer_fuel=MAX_BUILD_FUEL, step_lexer_fuel=MAX_STEP_FUEL, verbose_errors=False
        )
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return CompiledGrammar(spec, matcher)


def _llguidance_grammar(spec: GrammarSpec) -> str:
    from llguidance import LLMatcher

    if spec.kind in ("json_schema", "json_object"):
        text = spec.text if spec.kind == "json_schema" else '{"type": "object"}'
        if spec.whitespace == "":
            options = {"whitespace_flexible": False}
        else:
            options = {"whitespace_pattern": spec.whitespace or JSON_WHITESPACE}
        try:
            return LLMatcher.grammar_from_json_schema(text, overrides=options)
        except ValueError as exc:
            raise GrammarError(f"the schema is not a JSON object: {exc}") from None
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        choices = json.loads(spec.text)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError("choice must be a non-empty list of strings")
        return LLMatcher.grammar_from_lark("start: " + " | ".join(map(_lark_string, choices)))
    if spec.kind == "grammar":
        from llguidance import grammar_from

        try:
            return grammar_from("grammar", spec.text)  # Lark, or GBNF converted to Lark
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
    raise GrammarError(f"unknown grammar kind {spec.kind!r}")


def _lark_string(text: str) -> str:
    # Lark string literals take JSON's escapes; an empty literal is not allowed.
    return json.dumps(text) if text else '""?'


# ---------------------------------------------------------------------------------------------
# Masks on logits
# ---------------------------------------------------------------------------------------------


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row's bitmask: bit t % 32 of word t // 32 allows token t."""
    return (vocab_size + 31) // 32


def fill_bitmasks(matchers: list[GrammarMatcher], vocab_size: int) -> torch.Tensor:
    """Each matcher's allowed next tokens, [len(matchers), bitmask_words(vocab_size)] int32."""
    bitmasks = torch.empty(len(matchers), bitmask_words(vocab_size), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(bitmasks[row])
    return bitmasks


def apply_bitmask(logits: torch.Tensor, bitmasks: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of tokens the masks disallow to -inf, in place, on `rows` only.

    logits [num_rows, vocab] float32; bitmasks [len(rows), bitmask_words(vocab)] int32.
    A byte-table lookup plus an add is branch-free: masked_fill / where on a bool mask cost ~5x
    more on a 151k vocabulary (mispredicted branches on a mixed mask).
    NOTE: on CPU this runs in numpy, one row at a time, on one thread: torch's parallel kernels
    on tensors this small stalled for milliseconds on a loaded 2-core host (40 ms vs 0.06 ms
    per 151k row, benchmarks/grammar_engines.py).
    """
    vocab = logits.shape[1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        out = logits.numpy()
        mask_bytes = bitmasks.numpy().view(np.uint8)  # [n, words * 4], little-endian words
        for j, row in enumerate(rows):
            out[row] += np.take(_BYTE_BIAS_NP, mask_bytes[j], axis=0).reshape(-1)[:vocab]
    else:
        apply_bitmask_torch(logits, bitmasks, rows)


def apply_bitmask_torch(logits: torch.Tensor, bitmasks: torch.Tensor, rows: list[int]) -> None:
    """apply_bitmask in torch ops, for any device."""
    vocab = logits.shape[1]
    mask_bytes = bitmasks.to(logits.device).view(torch.uint8).view(-1)
    bias = _BYTE_BIAS.to(logits.device).index_select(0, mask_bytes.long())  # [n * words * 4, 8]
    bias = bias.view(len(rows), -1)[:, :vocab].to(logits.dtype)  # [n, vocab]
    logits.index_add_(0, torch.tensor(rows, device=logits.device), bias)
