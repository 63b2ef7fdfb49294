"""Prefix affinity for routing among replicas: a prompt's leading text as chained chunk hashes,
and a bounded table from those hashes to the replica that last served them (pure Python)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Collection, Hashable
from typing import Any

CHUNK_CHARS = 64  # about one 16-token KV block of English text
MAX_CHUNKS = 512  # the first 32K characters decide; longer prompts share no less


def prompt_text(body: bytes) -> str | None:
    """The text a request's prompt starts with, in the order the replica's prefix cache sees it:
    each chat message's role and content, or a completions prompt. None: no prompt to route by
    (another route, invalid JSON; the replica answers those)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    messages = data.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if isinstance(message, dict):
                parts.append(f"<{message.get('role')}>{_text(message.get('content'))}")
        return "".join(parts)
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]  # a batch of prompts, or one prompt as token ids
        return first if isinstance(first, str) else " ".join(str(t) for t in prompt)
    return None


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prefix_hashes(text: str, chunk_chars: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> tuple[int, ...]:
    """One hash per whole chunk of `text`, each covering everything before it too: two prompts
    share their first k hashes exactly when they share their first k chunks.

        text:    |  chunk 0  |  chunk 1  |  chunk 2  | tail (not hashed)
        hashes:     h0 = H(c0)  h1 = H(h0, c1)  h2 = H(h1, c2)
    """
    hashes: list[int] = []
    previous = 0
    for start in range(0, min(len(text) // chunk_chars, max_chunks) * chunk_chars, chunk_chars):
        previous = hash((previous, text[start : start + chunk_chars]))
        hashes.append(previous)
    return tuple(hashes)


class AffinityTable:
    """Prefix hash -> the replica that most recently served a prompt with that prefix.

    Invariant: at most `max_entries` hashes; the least recently recorded or matched go first.
    A hash names one replica; recording it again moves it to the newer one.
    """

    def __init__(self, max_entries: int = 1 << 18) -> None:
        self.max_entries = max_entries
        self._replicas: OrderedDict[int, Hashable] = OrderedDict()

    def __len__(self) -> int:
        return len(self._replicas)

    def lookup(
        self, hashes: tuple[int, ...], candidates: Collection[Hashable]
    ) -> tuple[Hashable, int] | None:
        """(replica, number of chunks it holds) for the longest prefix of `hashes` last served
        by one of `candidates`, or None."""
        for num_chunks in range(len(hashes), 0, -1):
            replica = self._replicas.get(hashes[num_chunks - 1])
            if replica is not None and replica in candidates:
                self._replicas.move_to_end(hashes[num_chunks - 1])
                return replica, num_chunks
        return None

    def record(self, hashes: tuple[int, ...], replica: Hashable) -> None:
        for h in hashes:
            self._replicas[h] = replica
            self._replicas.move_to_end(h)
        while len(self._replicas) > self.max_entries:
            self._replicas.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """Drop a replica that is gone (its cache went with it)."""
        for h in [h for h, r in self._replicas.items() if r == replica]:
            del self._replicas[h]
