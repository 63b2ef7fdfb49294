"""Grammar engines for structured outputs, measured on the catalogue models' vocabularies (issue 13).

    .venv/bin/python benchmarks/grammar_engines.py                       # both models, all engines
    .venv/bin/python benchmarks/grammar_engines.py --models smollm2-135m-instruct --engines llguidance

Candidates: llguidance, xgrammar and outlines-core (`pip install llguidance xgrammar outlines-core`;
an engine that is not installed is skipped). For each model's vocabulary (SmolLM2 49k tokens,
Qwen2.5 151k) and each engine:

- setup: the one-time tokenizer preparation (LLTokenizer / TokenizerInfo + GrammarCompiler /
  Vocabulary), from token bytes the script computes once.
- compile: a grammar from a typical JSON schema (nested object, enum, array, pattern, one optional
  property), from `json_object` (any JSON object), and from a 30-property flat schema: up to a
  matcher ready for its first mask (llguidance builds its lexer in the matcher, so a matcher's
  construction is compile there; a per-request copy of a cached one is `copy`).
- mask: filling one row's int32 bitmask along the tokens of a valid instance of the typical
  schema (tokenized by the model's own tokenizer), walked token by token: the first mask of a
  fresh matcher, then the median, 90th percentile and maximum of the others.
- advance: consuming one token (median over the same walk).
- apply: setting the disallowed logits of a [rows, vocab] float32 tensor to -inf from the
  bitmask: Kestrel's (`engine.grammar.apply_bitmask`, numpy on CPU), the same in torch ops
  (`apply_bitmask_torch`, what other devices run) and, if installed, xgrammar's CPU kernel; at 1
  and 16 rows, all rows masked, --threads torch threads.

Times are medians of --repeats runs (compile: fresh each run, the engines' caches off or cleared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.assets import resolve_model  # noqa: E402
from engine.grammar import apply_bitmask, apply_bitmask_torch, bitmask_words  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from server.serving import TokenText  # noqa: E402

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
ENGINES = ("llguidance", "xgrammar", "outlines-core")

TYPICAL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "role", "active"],
    "additionalProperties": False,
}
INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "tags": ["mathematics", "poetry", "engines"],
    "address": {"city": "London", "zip": "10001"},
    "role": "admin",
    "active": True,
}
JSON_OBJECT_SCHEMA = {"type": "object"}
WIDE_SCHEMA = {
    "type": "object",
    "properties": {
        f"field_{i}": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"},
                       {"type": "number"}, {"enum": ["a", "b", "c"]}][i % 5]
        for i in range(30)
    },
    "required": [f"field_{i}" for i in range(30)],
    "additionalProperties": False,
}  # fmt: skip

def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
    """Each token id's bytes as it adds them to the text (the server's TokenText), b"" for
    special tokens, which decoding skips, and for ids past the tokenizer's vocabulary."""
    text = TokenText(tokenizer)
    specials = set(tokenizer.all_special_ids)
    return [b"" if i in specials else text.token_bytes(i) for i in range(vocab_size)]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeats)) * 1e3


class Engine:
    """One grammar engine over one vocabulary: setup, compile to a fresh matcher, mask, advance."""

    name = ""

    def __init__(self, tokenizer: Tokenizer, vocab: list[bytes], num_rows: int) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.num_rows = num_rows  # the model's logits width (>= the tokenizer's vocabulary)
        self.eos = tokenizer.eos_token_ids

    def setup(self) -> None:
        raise NotImplementedError

    def compile(self, schema: dict) -> object:
        """A matcher at the start of `schema`, with nothing cached from earlier calls."""
        raise NotImplementedError

    def copy(self, matcher: object) -> object:
        """A fresh per-request matcher from a cached compiled grammar."""
        raise NotImplementedError

    def fill(self, matcher: object, mask: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, matcher: object, token_id: int) -> None:
        raise NotImplementedError


class LLGuidance(Engine):
    name = "llguidance"

    def setup(self) -> None:
        import llguidance

        self.ll = llguidance
        self.ll_tokenizer = llguidance.LLTokenizer(
            self.tokenizer.backend.to_str(), n_vocab=self.num_rows, eos_token=self.eos
        )

    def compile(self, schema: dict) -> object:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.ll.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def copy(self, matcher: object) -> object:
        return matcher.deep_copy()

    def fill(self, matcher: object, mask: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)

    def advance(self, matcher: object, token_id: int) -> None:
        assert matcher.consume_token(token_id), matcher.get_error()


class XGrammar(Engine):
    name = "xgrammar"

    def setup(self) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo(
            self.vocab, xgrammar.VocabType.RAW, vocab_size=self.num_rows, stop_token_ids=self.eos
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    def compile(self, schema: dict) -> object:
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
        return self.xgr.GrammarMatcher(compiled)

    def copy(self, matcher: object) -> object:
        return matcher.fork()

    def fill(self, matcher: object, mask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(mask.view(1, -1))

    def advance(self, matcher: object, token_id: int) -> None:
        assert matcher.accept_token(token_id)


class OutlinesCore(Engine):
    name = "outlines-core"

    def setup(self) -> None:
        import outlines_core

        self.oc = outlines_core
        eos = self.eos[0]
        tokens: dict[bytes, list[int]] = {}
        specials = self.tokenizer.all_special_ids
        for token_id, raw in enumerate(self.vocab):
            if raw and token_id not in specials and token_id != eos:
                tokens.setdefault(raw, []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, schema: dict) -> object:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def copy(self, matcher: object) -> object:
        guide = matcher
        guide.reset()
        return guide

    def fill(self, matcher: object, mask: torch.Tensor) -> None:
        matcher.write_mask_into(mask.data_ptr(), mask.numel(), 4)

    def advance(self, matcher: object, token_id: int) -> None:
        matcher.advance(token_id, return_tokens=False)


ENGINE_CLASSES = {cls.name: cls for cls in (LLGuidance, XGrammar, OutlinesCore)}


def measure(engine: Engine, token_ids: list[int], repeats: int) -> dict[str, float | str]:
    row: dict[str, float | str] = {}
    row["setup_ms"] = timed(engine.setup)[0] * 1e3  # once: the engines cache nothing across runs here
    for label, schema in (("typical", TYPICAL_SCHEMA), ("json_object", JSON_OBJECT_SCHEMA), ("30_props", WIDE_SCHEMA)):
        try:
            row[f"compile_{label}_ms"] = median_ms(lambda s=schema: engine.compile(s), repeats)
        except Exception as exc:  # noqa: BLE001 - an engine that cannot compile a schema shows it
            row[f"compile_{label}_ms"] = f"error: {type(exc).__name__}: {str(exc)[:80]}"
    cached = engine.compile(TYPICAL_SCHEMA)
    row["copy_us"] = median_ms(lambda: engine.copy(cached), repeats) * 1e3

    mask = torch.zeros(bitmask_words(engine.num_rows), dtype=torch.int32)
    fill_times, first_times, advance_times = [], [], []
    for _ in range(repeats):
        matcher = engine.compile(TYPICAL_SCHEMA)
        for step, token_id in enumerate([*token_ids, engine.eos[0]]):
            elapsed = timed(lambda m=matcher: engine.fill(m, mask))[0]
            (fill_times if step else first_times).append(elapsed)
            allowed = bool((mask[token_id // 32] >> (token_id % 32)) & 1)
            assert allowed, f"{engine.name}: token {token_id} of the instance is not allowed"
            if token_id != engine.eos[0]:
                advance_times.append(timed(lambda m=matcher, t=token_id: engine.advance(m, t))[0])
    row["mask_us"] = statistics.median(fill_times) * 1e6
    row["mask_p90_us"] = statistics.quantiles(fill_times, n=10)[-1] * 1e6
    row["mask_max_us"] = max(fill_times) * 1e6
    row["first_mask_us"] = statistics.median(first_times) * 1e6
    row["advance_us"] = statistics.median(advance_times) * 1e6
    return row


def measure_apply(num_rows: int, repeats: int) -> dict[str, float]:
    """Applying a bitmask to `rows` logits rows with Kestrel's torch code and xgrammar's kernel."""
    out = {}
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 16):
        logits = torch.randn(rows, num_rows, generator=generator)
        masks = torch.randint(-(2**31), 2**31 - 1, (rows, bitmask_words(num_rows)), dtype=torch.int32, generator=generator)
        indices = list(range(rows))
        out[f"apply_kestrel_{rows}_us"] = median_ms(lambda: apply_bitmask(logits, masks, indices), repeats * 10) * 1e3  # noqa: B023
        out[f"apply_torch_{rows}_us"] = median_ms(lambda: apply_bitmask_torch(logits, masks, indices), repeats * 10) * 1e3  # noqa: B023
        try:
            import xgrammar

            out[f"apply_xgr_{rows}_us"] = median_ms(
                lambda: xgrammar.apply_token_bitmask_inplace(logits, masks, backend="cpu"), repeats * 10  # noqa: B023
            ) * 1e3
        except ImportError:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the apply step")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for model in args.models.split(","):
        model_dir = resolve_model(model)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        num_rows = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        vocab = token_bytes(tokenizer, num_rows)
        token_ids = tokenizer.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False)
        apply = measure_apply(num_rows, args.repeats)
        for name in args.engines.split(","):
            engine = ENGINE_CLASSES[name](tokenizer, vocab, num_rows)
            try:
                row = measure(engine, token_ids, args.repeats)
            except ImportError as exc:
                print(f"{name}: not installed ({exc})", file=sys.stderr)
                continue
            row = {"model": model, "vocab": num_rows, "engine": name, **row, **apply}
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_table(rows: list[dict]) -> None:
    columns = [
        ("model", "model"), ("engine", "engine"), ("setup_ms", "setup ms"),
        ("compile_typical_ms", "compile schema ms"), ("compile_json_object_ms", "compile json_object ms"),
        ("compile_30_props_ms", "compile 30 props ms"), ("copy_us", "per-request matcher us"),
        ("first_mask_us", "first mask us"), ("mask_us", "mask us (median)"), ("mask_p90_us", "mask us (p90)"),
        ("mask_max_us", "mask us (max)"), ("advance_us", "advance us"),
    ]  # fmt: skip

    def cell(value: object) -> str:
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(title for _, title in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(key, "")) for key, _ in columns) + " |")
    print()
    applies = sorted({k for row in rows for k in row if k.startswith("apply_")})
    print("| model | " + " | ".join(applies) + " |")
    print("|" + "---|" * (len(applies) + 1))
    for model in dict.fromkeys(row["model"] for row in rows):
        row = next(r for r in rows if r["model"] == model)
        print(f"| {model} | " + " | ".join(cell(row.get(k, "")) for k in applies) + " |")


if __name__ == "__main__":
    main()
