"""engine.grammar: specs compiled to per-token masks over a byte-level vocabulary, the masks on
logits, and the sampler / speculation rules for constrained rows (no model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarMatcher,
    GrammarSpec,
    apply_bitmask,
    apply_bitmask_torch,
    bitmask_words,
    fill_bitmasks,
)
from engine.sampler import Sampler
from engine.speculation import can_speculate
from engine.tokenizer import Tokenizer
from tests.conftest import write_byte_tokenizer
from tests.engine.factories import make_seq

EOS = 0  # byte 0x00 doubles as end-of-sequence: JSON never contains it raw
VOCAB = 260  # logits wider than the tokenizer's 256 tokens, as models pad their vocabularies
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 3}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> GrammarCompiler:
    path: Path = tmp_path_factory.mktemp("byte-tokenizer")
    write_byte_tokenizer(path)
    return GrammarCompiler(Tokenizer.from_pretrained(path), VOCAB, [EOS])


def allowed(matcher: GrammarMatcher) -> set[int]:
    mask = fill_bitmasks([matcher], VOCAB)[0]
    return {t for t in range(VOCAB) if (int(mask[t // 32]) >> (t % 32)) & 1}


def walk(matcher: GrammarMatcher, text: str) -> None:
    """Feed `text` byte by byte, checking each byte was allowed first."""
    for byte in text.encode():
        assert byte in allowed(matcher), (text, chr(byte))
        assert matcher.accept(byte)


def test_json_schema_allows_exactly_the_schema_and_terminates_at_its_end(compiler):
    matcher = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA))).matcher()
    first = allowed(matcher)
    assert ord("{") in first and EOS not in first and ord("[") not in first
    walk(matcher, '{"name":"abc"')
    assert ord('"') not in allowed(matcher)  # maxLength 3 already reached, the string is closed
    walk(matcher, ',"ok":true')
    assert not matcher.is_terminated
    walk(matcher, "}")
    assert matcher.is_terminated and matcher.error is None
    assert allowed(matcher) == {EOS}


def test_padded_vocabulary_rows_are_never_allowed(compiler):
    matcher = compiler.compile(GrammarSpec("regex", "[^x]*")).matcher()
    assert not allowed(matcher) & set(range(256, VOCAB))


def test_regex_allows_eos_once_complete_and_goes_on(compiler):
    matcher = compiler.compile(GrammarSpec("regex", "[0-9]+")).matcher()
    assert allowed(matcher) == set(b"0123456789")
    walk(matcher, "42")
    assert allowed(matcher) == set(b"0123456789") | {EOS} and not matcher.is_terminated


def test_choice_allows_only_the_choices(compiler):
    matcher = compiler.compile(GrammarSpec("choice", json.dumps(["yes", "no", ""]))).matcher()
    assert allowed(matcher) == {ord("y"), ord("n"), EOS}
    walk(matcher, "no")
    assert matcher.is_terminated


def test_json_object_takes_any_object_and_bounded_whitespace(compiler):
    matcher = compiler.compile(GrammarSpec("json_object")).matcher()
    assert ord("[") not in allowed(matcher)
    walk(matcher, '{ "a" : [1, {"b": null}],\n"c": "d"}')
    assert matcher.is_terminated
    matcher = compiler.compile(GrammarSpec("json_object")).matcher()
    walk(matcher, "{" + " " * 16)
    assert ord(" ") not in allowed(matcher)


def test_no_whitespace_spec_allows_none(compiler):
    matcher = compiler.compile(GrammarSpec("json_object", whitespace="")).matcher()
    walk(matcher, "{")
    assert ord(" ") not in allowed(matcher)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (GrammarSpec("json_schema", '{"type": "foo"}'), "foo"),
        (GrammarSpec("json_schema", '{"type": "object", "dependentRequired": {"a": ["b"]}}'), "dependentRequired"),
        (GrammarSpec("json_schema", '{"properties": {"a": {"$ref": "#/$defs/missing"}}}'), "missing"),
        (GrammarSpec("json_schema", "[1, 2]"), "object"),
        (GrammarSpec("regex", "[a-"), "regex"),
        (GrammarSpec("choice", "[]"), "choice"),
        (GrammarSpec("grammar", "start: undefined_rule"), "undefined_rule"),
    ],
)
def test_invalid_or_unsupported_grammars_raise(compiler, spec, message):
    with pytest.raises(GrammarError, match=message):
        compiler.compile(spec)
    assert compiler.cached(spec) is None


def test_compiled_grammars_are_cached_by_spec_and_matchers_are_independent(compiler):
    spec = GrammarSpec("regex", "a+b")
    compiled = compiler.compile(spec)
    assert compiler.cached(spec) is compiled and compiler.compile(GrammarSpec("regex", "a+b")) is compiled
    one, two = compiled.matcher(), compiled.matcher()
    walk(one, "aab")
    assert one.is_terminated and allowed(two) == {ord("a")}


def test_apply_bitmask_sets_disallowed_logits_to_minus_inf_on_given_rows_only(compiler):
    matchers = [compiler.compile(GrammarSpec("regex", "[ab]")).matcher(),
                compiler.compile(GrammarSpec("regex", "[0-9]")).matcher()]  # fmt: skip
    bitmasks = fill_bitmasks(matchers, VOCAB)
    logits = torch.randn(3, VOCAB)
    expected = logits.clone()
    for row, tokens in ((0, b"ab"), (2, b"0123456789")):
        keep = torch.full((VOCAB,), float("-inf"))
        keep[list(tokens)] = 0.0
        expected[row] += keep
    numpy_path, torch_path = logits.clone(), logits.clone()
    apply_bitmask(numpy_path, bitmasks, [0, 2])
    apply_bitmask_torch(torch_path, bitmasks, [0, 2])
    assert torch.equal(numpy_path, expected) and torch.equal(torch_path, expected)


def test_bitmask_words():
    assert [bitmask_words(n) for n in (1, 32, 33, 151936)] == [1, 1, 2, 4748]


def test_sampler_constrains_grammar_rows_and_leaves_the_others_alone(compiler):
    compiled = compiler.compile(GrammarSpec("regex", "[xyz]"))
    seqs = [make_seq(temperature=0.0), make_seq(temperature=0.0), make_seq(temperature=1.0, seed=7)]
    seqs[0].grammar, seqs[2].grammar = compiled.matcher(), compiled.matcher()
    logits = torch.randn(3, VOCAB) * 5
    logits[:, ord("x")] = -50.0  # the unconstrained argmax is elsewhere
    tokens, _ = Sampler([EOS])(logits.clone(), seqs)
    assert tokens[0] == max(b"xyz", key=lambda t: logits[0, t])
    assert tokens[1] == int(logits[1].argmax())
    assert tokens[2] in b"xyz"


def test_constrained_rows_do_not_draft(compiler):
    seq = make_seq(temperature=0.0, grammar=compiler.compile(GrammarSpec("json_object")))
    assert not can_speculate(seq)
    assert can_speculate(make_seq(temperature=0.0))


# -- the engine on a tiny random model (its 256 byte tokens; eos is byte 2) ---------------------


def test_engine_outputs_match_their_grammar_and_leave_other_rows_alone(tiny_llama):
    from engine import LLM, SamplingParams

    llm = LLM(str(tiny_llama), dtype="float32", max_model_len=256)
    prompts = [[1, 5, 9, 33], [1, 70, 71, 72, 73]]
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompts[:1], plain)[0].completions[0].token_ids
    pattern = "[a-c]{2,5}x"
    constrained = [SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=20,
                                  grammar=GrammarSpec("regex", pattern)) for seed in range(3)]  # fmt: skip
    results = llm.generate(prompts[:1] + prompts[1:] * 3, [plain, *constrained])
    assert results[0].completions[0].token_ids == alone
    texts = [c.text for r in results[1:] for c in r.completions]
    assert all(re.fullmatch(pattern, t) for t in texts), texts
    assert {c.finish_reason for r in results[1:] for c in r.completions} == {"stop"}
    assert len(set(texts)) > 1
