"""Text <-> token ids for one model: `tokenizers` for (de)tokenization, jinja2 for chat templates."""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers copies a message's reasoning under all of these names before rendering.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Where placeholders for special-token strings in client text are drawn from (Unicode private use).
_PRIVATE_USE = ((0xE000, 0xF8FF), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))


class ChatTemplateError(ValueError):
    """The chat template is missing, does not compile, or rejected the conversation."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param  # the request field to blame


# ---------------------------------------------------------------------------------------------
# Chat template environment (the helpers Hugging Face chat templates expect)
# ---------------------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja's own tojson: no HTML escaping, keys keep their order, non-ASCII kept as is.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's `namespace()` that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same self-less signature as jinja's
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore-prefixed namespace attributes ({name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders the body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Any) -> str:
        return caller()


def _make_template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env


_TEMPLATE_ENV = _make_template_env()


def _alias_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Same aliasing transformers does, so templates reading `reasoning_content` or `thinking`
    # render identically; copies only the messages that change.
    out = []
    for message in messages:
        if isinstance(message, dict):
            reasoning = next(
                (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
            )
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _cut_after_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """The rendered conversation up to the end of the final message's content (no end-of-turn)."""
    final = str(messages[-1].get("content") or "") if messages else ""
    position = text.rfind(final.rstrip()) if final.strip() else -1
    if position < 0:
        raise ChatTemplateError(
            "continue_final_message: the final message's content was not found in the rendered prompt",
            param="continue_final_message",
        )
    return text[: position + len(final.rstrip())]


# ---------------------------------------------------------------------------------------------
# Client strings (everything a caller passes to the template)
# ---------------------------------------------------------------------------------------------


def _encode(backend: tokenizers.Tokenizer, text: str, add_special_tokens: bool) -> tokenizers.Encoding:
    """backend.encode(text), but without holding the GIL: the library's `encode` keeps it for the
    whole call (a 2M-character text froze every other thread for 1.4 s), `encode_batch` lets it go.
    Same ids."""
    return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]


def _iter_strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _iter_strings(key)
            yield from _iter_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _iter_strings(item)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a JSON-like value with every string, dict keys included, replaced by fn(string)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(key, fn): _map_strings(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_strings(item, fn) for item in value)
    return value


def _unused_chars(num: int, used: set[str]) -> list[str]:
    """`num` private-use characters not in `used`."""
    candidates = (chr(c) for lo, hi in _PRIVATE_USE for c in range(lo, hi + 1))
    chars = list(itertools.islice((c for c in candidates if c not in used), num))
    if len(chars) < num:
        raise ChatTemplateError("the messages use every private-use character")
    return chars


def _defuse(
    client: Any, pattern: re.Pattern[str], found: set[str], template: str
) -> tuple[Any, dict[int, str]]:
    """`client` with each special-token string in `found` (all that `pattern` matches in it)
    swapped for a private-use character used nowhere in its strings or in `template`, and the
    `str.translate` table that swaps them back."""
    used = {c for s in _iter_strings(client) for c in s}
    used.update(template)
    placeholders = dict(zip(sorted(found), _unused_chars(len(found), used), strict=True))
    defused = _map_strings(client, lambda s: pattern.sub(lambda m: placeholders[m.group()], s))
    return defused, {ord(p): token for token, p in placeholders.items()}


def _special_regex(
    tokens: list[tokenizers.AddedToken], *, with_stripped_space: bool
) -> re.Pattern[str] | None:
    """One group matching any of `tokens`, longest first as the tokenizers library matches them;
    `with_stripped_space` also takes the whitespace that an lstrip / rstrip token absorbs."""
    parts = []
    for token in sorted(tokens, key=lambda t: len(t.content), reverse=True):
        part = re.escape(token.content)
        if with_stripped_space:
            part = (r"\s*" if token.lstrip else "") + part + (r"\s*" if token.rstrip else "")
        parts.append(part)
    return re.compile(f"({'|'.join(parts)})") if parts else None


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face model directory
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """A special token entry in tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def read_template_override(chat_template: str | Path) -> str:
    if isinstance(chat_template, Path):
        if not chat_template.is_file():
            raise ChatTemplateError(f"chat template file not found: {chat_template}")
        return chat_template.read_text(encoding="utf-8")
    # A short single-line string naming an existing file is a path; anything else is the template.
    if "\n" not in chat_template and "{" not in chat_template and len(chat_template) < 4096:
        path = Path(chat_template).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise ChatTemplateError(f"chat template file not found: {chat_template}")
    return chat_template


def _read_chat_templates(model_dir: Path, tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """Named chat templates; a `chat_template.jinja` file wins over tokenizer_config.json."""
    templates: dict[str, str] = {}
    raw = tokenizer_config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                templates[str(entry.get("name", "default"))] = entry["template"]
    elif isinstance(raw, dict):
        templates.update({str(k): v for k, v in raw.items() if isinstance(v, str)})
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """One model's tokenizer: encode/decode exactly as transformers does for the same directory,
    plus chat-template rendering.

    Invariants: `encode`/`decode` are the `tokenizers` library's results for tokenizer.json (its
    post-processor decides whether a BOS is added, as in transformers 5; only when it has none do
    tokenizer_config.json's add_bos_token/add_eos_token apply);
    `eos_token_ids` is non-repeating, generation_config.json's ids first; `skip_special_ids`
    is exactly the set of ids that `decode(..., skip_special_tokens=True)` drops; in
    `encode_chat` only the chat template's own markup becomes special tokens.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str | None],
        chat_templates: dict[str, str] | None = None,
        generation_config: dict[str, Any] | None = None,
        extra_special_tokens: Iterable[str] = (),
    ) -> None:
        self._backend = backend
        self._special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self._chat_templates = dict(chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}
        gen = generation_config or {}

        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

        def named_id(name: str) -> int | None:
            token = self._special_tokens.get(name)
            return backend.token_to_id(token) if token is not None else None

        bos = named_id("bos_token")
        self.bos_token_id: int | None = bos if bos is not None else gen.get("bos_token_id")
        pad = named_id("pad_token")
        self.pad_token_id: int | None = pad if pad is not None else gen.get("pad_token_id")
        self.unk_token_id: int | None = named_id("unk_token")
        eos_ids = _as_id_list(gen.get("eos_token_id"))
        tokenizer_eos = named_id("eos_token")
        if tokenizer_eos is not None:
            eos_ids.append(tokenizer_eos)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_ids))

        added = backend.get_added_tokens_decoder()
        self.skip_special_ids: frozenset[int] = frozenset(
            i for i, tok in added.items() if tok.special
        )
        specials = [tok for tok in added.values() if tok.special]
        self._special_in_client = _special_regex(specials, with_stripped_space=False)
        self._special_in_rendered = _special_regex(specials, with_stripped_space=True)
        named = [named_id(n) for n in _NAMED_SPECIAL_TOKENS]
        named += [backend.token_to_id(t) for t in extra_special_tokens]
        self.all_special_ids: set[int] = set(self.skip_special_ids) | {
            i for i in named if i is not None
        }
        # Sentencepiece-style `<0xHH>` byte tokens: a run of them is decoded as one unit.
        self.byte_fallback_ids: frozenset[int] = frozenset()
        if getattr(backend.model, "byte_fallback", False):
            ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
            self.byte_fallback_ids = frozenset(i for i in ids if i is not None)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, chat_template: str | Path | None = None
    ) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and generation_config.json from a directory.

        `chat_template` overrides the model's template: a path to a file, or the template text.
        """
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(model_dir / "tokenizer_config.json")

        if backend.post_processor is None:
            # NOTE: transformers 5 would add nothing here (it drops add_bos_token when a
            # tokenizer.json exists); honouring the flag keeps what the model was trained with.
            bos = _token_content(config.get("bos_token")) if config.get("add_bos_token") else None
            eos = _token_content(config.get("eos_token")) if config.get("add_eos_token") else None
            install_post_processor(backend, bos=bos, eos=eos)

        gen = _read_json(model_dir / "generation_config.json")
        if not gen:
            gen = _read_json(model_dir / "config.json")

        templates = _read_chat_templates(model_dir, config)
        if chat_template is not None:
            templates = {"default": read_template_override(chat_template)}

        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        return cls(
            backend,
            special_tokens={n: _token_content(config.get(n)) for n in _NAMED_SPECIAL_TOKENS},
            chat_templates=templates,
            generation_config=gen,
            extra_special_tokens=[t for t in map(_token_content, extra) if t is not None],
        )

    # -- tokens -----------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_tokens.get("unk_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _encode(self._backend, text, add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str | None] | None:
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    # -- chat -------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        /,
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text, as transformers' apply_chat_template(tokenize=False).

        `continue_final_message` cuts the text after the final message's content, so the model
        continues that message. Raises ChatTemplateError when there is no template, it does not
        compile, it calls raise_exception(), or it fails on the given messages.
        """
        template = self._get_compiled(tools)
        variables: dict[str, Any] = {"documents": None, **self._special_tokens, **template_kwargs}
        try:
            text = template.render(
                variables,
                messages=_alias_reasoning(messages),
                tools=tools,
                add_generation_prompt=add_generation_prompt,
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError) as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
        return _cut_after_final_message(text, messages) if continue_final_message else text

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        /,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation.

        Only the template's own markup becomes special tokens: every string passed in (message
        contents, names, tool calls, tool definitions, template kwargs; dict keys too) is encoded
        as plain text even where it spells a special token such as `<|im_end|>`.
        `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS, say) on top.
        """
        render = functools.partial(
            self.apply_chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        client = (messages, tools, template_kwargs)
        pattern = self._special_in_client
        found: set[str] = set()
        if pattern is not None:
            found = {m.group() for s in _iter_strings(client) for m in pattern.finditer(s)}
        if not found:
            # The common case: every special token in the rendered text is the template's.
            text = render(messages, tools=tools, **template_kwargs)
            return self.encode(text, add_special_tokens=add_special_tokens)

        assert pattern is not None
        template = self._chat_templates.get(self._template_name(tools)) or ""
        (messages, tools, template_kwargs), restore = _defuse(client, pattern, found, template)
        text = render(messages, tools=tools, **template_kwargs)
        return self._encode_rendered(text, restore, add_special_tokens)

    def _encode_rendered(
        self, text: str, restore: dict[int, str], add_special_tokens: bool
    ) -> list[int]:
        """Ids of a conversation rendered from defused client strings: the special tokens in
        `text` are the template's and become their ids; the text between them, with the client's
        special-token strings put back (`str.translate(restore)`), is encoded as plain text."""
        # NOTE: the library itself splits at special tokens before normalizing and
        # pre-tokenizing, so text free of special strings gets the same ids as one encode of the
        # whole (except after a special token under a Metaspace pre-tokenizer with
        # prepend_scheme="first", which prepends to the run as to the start of a text).
        assert self._special_in_rendered is not None
        # split() with the pattern's one group: text, special, text, special, ..., text
        pieces = self._special_in_rendered.split(text)
        parts = [
            _encode(self._backend, piece, False)
            if i % 2
            else _encode(self._text_backend, piece.translate(restore), False)
            for i, piece in enumerate(pieces)
            if piece
        ]
        encoding = tokenizers.Encoding.merge(parts, growing_offsets=True)
        return self._backend.post_process(encoding, add_special_tokens=add_special_tokens).ids

    @functools.cached_property
    def _text_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token strings as plain text."""
        # NOTE: a copy, not the flag toggled around a call: the flag is state of the instance,
        # and encode runs on several threads at once.
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def chat_template_source(self, tools: list[dict[str, Any]] | None = None) -> str | None:
        """The template text used for a conversation with (or without) `tools`."""
        return self._chat_templates.get(self._template_name(tools))

    def _template_name(self, tools: list[dict[str, Any]] | None) -> str:
        return "tool_use" if tools is not None and "tool_use" in self._chat_templates else "default"

    def _get_compiled(self, tools: list[dict[str, Any]] | None) -> jinja2.Template:
        name = self._template_name(tools)
        compiled = self._compiled.get(name)
        if compiled is not None:
            return compiled
        source = self._chat_templates.get(name)
        if source is None:
            raise ChatTemplateError(
                "this model has no chat template (none in tokenizer_config.json or "
                "chat_template.jinja); pass a chat template override or use the completions API"
            )
        try:
            compiled = _TEMPLATE_ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self._compiled[name] = compiled
        return compiled


def install_post_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> None:
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    specials = [(t, i) for t, i in specials if i is not None]
    ids = dict(specials)
    bos = bos if bos in ids else None
    eos = eos if eos in ids else None
    single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
    pair_b = " ".join(p for p in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} {pair_b}", special_tokens=specials
    )


# ---------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns one sequence's generated ids, fed a few at a time, into text deltas.

    Invariants:
    - a delta never ends in an incomplete UTF-8 character: while the decoded window ends in
      U+FFFD the trailing text is held back (a genuine U+FFFD is released by the next clean
      token or by `flush()`);
    - `"".join(deltas) + flush()` == `tokenizer.decode(generated_ids, skip_special_tokens)`,
      i.e. the completion decoded on its own, as transformers would;
    - each `step` decodes only a short window (`_MAX_WINDOW` tokens plus any held-back tokens).

    How: the window holds a few already-emitted "context" tokens plus the new ones. Decoders
    treat only the start of a decode specially (Metaspace/Strip drop a leading space, a split
    UTF-8 char shows as U+FFFD), so decode(context + new) starts with decode(context) and the
    delta is the rest. The window begins at the first generated token, so the first token is
    decoded exactly as in decode(generated_ids).
    """

    _MAX_WINDOW = 16
    _CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        # NOTE: the prompt is deliberately not used as decoding context: the target text is
        # decode(generated_ids) alone, and a prompt prefix would keep a leading space that
        # Metaspace/Strip decoders drop from the first generated token.
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend
        self._skip_ids = tokenizer.skip_special_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_fallback_ids
        self._window: list[int] = []
        self._num_emitted = 0  # chars of decode(self._window) already returned
        self._deltas: list[str] = []

    def is_skipped(self, token_id: int) -> bool:
        """Whether `token_id` never shows in the text (a special token under skip_special_tokens)."""
        return token_id in self._skip_ids

    @property
    def text(self) -> str:
        """All text returned so far (not including held-back text)."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def step(self, new_token_ids: list[int]) -> str:
        """Add generated ids; return the text they complete (possibly '')."""
        if self._skip_ids:
            # Equivalent to decoding with skip_special_tokens=True, and keeps the window's
            # first token a real one.
            new_token_ids = [i for i in new_token_ids if i not in self._skip_ids]
        if not new_token_ids:
            return ""
        window = self._window
        window.extend(new_token_ids)
        text = self._backend.decode(window, skip_special_tokens=False)
        end = len(text)
        while end > self._num_emitted and text[end - 1] == _REPLACEMENT_CHAR:
            end -= 1
        delta = ""
        if end > self._num_emitted:
            delta = text[self._num_emitted : end]
            self._num_emitted = end
        if end == len(text) and len(window) > self._MAX_WINDOW:
            self._slide()
        if delta:
            self._deltas.append(delta)
        return delta

    def flush(self) -> str:
        """Release held-back text (the sequence's final ids really decode to U+FFFD)."""
        if not self._window:
            return ""
        text = self._backend.decode(self._window, skip_special_tokens=False)
        delta = text[self._num_emitted :]
        self._num_emitted = len(text)
        if delta:
            self._deltas.append(delta)
        return delta

    def _slide(self) -> None:
        # Called only when everything decoded so far has been emitted.
        window = self._window
        cut = len(window) - self._CONTEXT
        # Never split a run of byte-fallback tokens: the run is decoded as one unit.
        while cut > 0 and window[cut] in self._byte_ids:
            cut -= 1
        if cut <= 0:
            return
        context = window[cut:]
        context_text = self._backend.decode(context, skip_special_tokens=False)
        if not context_text:
            return  # an empty context would let a Strip/Metaspace decoder eat the next space
        self._window = context
        self._num_emitted = len(context_text)
