"""Speculative decoding by prompt lookup: guess a sequence's next tokens from its own history.

When a sequence's last few tokens occurred before (in its prompt or its output), the tokens that
followed then are a cheap guess at what follows now: answers quote their question, code repeats
names, summaries copy phrases. The engine runs the guesses ("draft") through the model in the
same step as the sequence's real next token, one query row each, and keeps the draft up to the
first token the model would not have chosen itself, plus the model's own choice there.

Only greedy sequences whose next token depends on nothing but the logits take part, so the
tokens are exactly those of plain decoding; the fused attention kernel and linears compute each
row alone, so they are bit for bit the same too. It pays while a step is bound by reading the
weights (few sequences), where a few more rows cost little.
"""

from __future__ import annotations

from engine.request import Sequence

# Longest and shortest run of last tokens looked up; longer matches first.
MAX_MATCH = 3
MIN_MATCH = 2


def can_speculate(seq: Sequence) -> bool:
    """Whether the model's argmax alone decides `seq`'s next tokens (no sampling, penalties,
    biases, logprobs or min_tokens mask) and it has one sequence."""
    p = seq.request.params
    return (
        p.is_greedy
        and p.n == 1
        and p.logprobs is None
        and not p.logit_bias
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and seq.num_generated_tokens >= p.min_tokens
    )


def propose_draft(token_ids: list[int], max_tokens: int) -> list[int]:
    """Up to `max_tokens` tokens that followed the latest earlier occurrence of the sequence's
    last MAX_MATCH (down to MIN_MATCH) tokens; empty if none occurred before."""
    if max_tokens <= 0:
        return []
    end = len(token_ids)
    # Searched in the reversed history with list.index (C speed): this runs every step, and a
    # Python loop over a long context took ~0.2 ms per 2,000 tokens. At reversed index j a
    # match covers token_ids[end - j - n : end - j]; the smallest j >= 1 is the latest one.
    reversed_ids = token_ids[::-1]
    for n in range(MAX_MATCH, MIN_MATCH - 1, -1):
        if end <= n:
            continue
        reversed_tail = reversed_ids[:n]
        j = 0
        try:
            while True:
                j = reversed_ids.index(reversed_tail[0], j + 1)
                if reversed_ids[j : j + n] == reversed_tail:
                    return token_ids[end - j : end - j + max_tokens]
        except ValueError:  # no (further) occurrence
            continue
    return []


def accepted_tokens(draft: list[int], choices: list[int]) -> list[int]:
    """The tokens a verification step yields: `choices[j]` is the model's choice after the
    real token and draft[:j]; the draft holds while it agrees with them."""
    accepted = [choices[0]]
    for guess, choice in zip(draft, choices[1:]):
        if guess != accepted[-1]:
            break
        accepted.append(choice)
    return accepted
