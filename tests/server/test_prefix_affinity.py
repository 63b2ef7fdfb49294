"""server.prefix_affinity: prompt text, chained chunk hashes, the replica table; and the [ray]
settings (no Ray needed)."""

from __future__ import annotations

import json

import pytest

from server.prefix_affinity import AffinityTable, prefix_hashes, prompt_text
from server.settings import RayConfig, SettingsError, build_ray_config, resolve_values

SYSTEM = "You are a careful assistant who answers briefly. " * 3


def chat_body(*messages: tuple[str, str]) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]}).encode()


def test_prompt_text_of_chat_completions_and_other_bodies() -> None:
    assert prompt_text(chat_body(("system", "S"), ("user", "U"))) == "<system>S<user>U"
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert prompt_text(json.dumps(parts).encode()) == "<user>ab"
    assert prompt_text(b'{"prompt": "Once upon"}') == "Once upon"
    assert prompt_text(b'{"prompt": ["first", "second"]}') == "first"
    assert prompt_text(b'{"prompt": [1, 2, 3]}') == "1 2 3"
    assert prompt_text(b'{"tokens": [1]}') is None
    assert prompt_text(b"{not json") is None
    assert prompt_text(b"[1, 2]") is None
    assert prompt_text(b"\xff") is None


def test_next_turn_extends_the_first_turns_hashes() -> None:
    first = prompt_text(chat_body(("system", SYSTEM), ("user", "What is a tide?")))
    second = prompt_text(chat_body(("system", SYSTEM), ("user", "What is a tide?"),
                                   ("assistant", "The sea rising."), ("user", "Why?")))  # fmt: skip
    h1, h2 = prefix_hashes(first), prefix_hashes(second)
    assert len(h1) == len(first) // 64 and len(h2) == len(second) // 64
    assert h2[: len(h1)] == h1
    other = prefix_hashes(prompt_text(chat_body(("system", SYSTEM + "!"), ("user", "Hi"))))
    assert other[:2] == h1[:2]  # the shared system prompt's whole chunks
    assert prefix_hashes("x" * 63) == ()
    assert len(prefix_hashes("x" * 10_000, chunk_chars=64, max_chunks=10)) == 10
    # each hash covers everything before it: equal chunks at different depths differ
    assert len(set(prefix_hashes("a" * 64 * 4))) == 4


def test_affinity_table_longest_prefix_among_candidates() -> None:
    table = AffinityTable()
    table.record((1, 2, 3), "A")
    table.record((1, 5), "B")  # the shared first chunk moves to B
    assert table.lookup((1, 2, 3, 4), {"A", "B"}) == ("A", 3)
    assert table.lookup((1, 9), {"A", "B"}) == ("B", 1)
    assert table.lookup((1, 2, 3), {"B"}) == ("B", 1)  # A is not a candidate (busy, gone)
    assert table.lookup((7,), {"A", "B"}) is None
    table.forget("B")
    assert table.lookup((1, 5), {"A", "B"}) is None and len(table) == 2


def test_affinity_table_drops_least_recent_beyond_its_size() -> None:
    table = AffinityTable(max_entries=3)
    table.record((1, 2), "A")
    table.record((3,), "B")
    assert table.lookup((1,), {"A"}) == ("A", 1)  # 1 is now the most recent
    table.record((4,), "C")
    assert len(table) == 3
    assert table.lookup((2,), {"A"}) is None  # the oldest went first
    assert table.lookup((1,), {"A"}) == ("A", 1)


def test_ray_settings() -> None:
    assert build_ray_config(resolve_values()) == RayConfig()
    assert not RayConfig().is_enabled
    config = build_ray_config(resolve_values(None, {"KESTREL_REPLICAS": "2"},
                                             ["--max-replicas", "4", "--routing", "pow2"]))  # fmt: skip
    assert config.replicas == 2 and config.is_autoscaling and config.routing == "pow2"
    with pytest.raises(SettingsError, match="min_replicas"):
        build_ray_config(resolve_values(None, {}, ["--replicas", "5", "--max-replicas", "4"]))
    with pytest.raises(SettingsError, match="routing"):
        resolve_values(None, {}, ["--routing", "random"])
