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

Row layout: a scheduled entry's draft tokens follow its real new token in the step's input, so
an entry whose prompt is all computed owns 1 + len(draft) consecutive logits rows: row j is the
model's choice after the real token and draft[:j].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.request import Sequence

if TYPE_CHECKING:  # the scheduler imports this module
    from engine.scheduler import ScheduledSequence

# Longest and shortest run of last tokens looked up; longer matches first.
MAX_MATCH = 3
MIN_MATCH = 2


def can_speculate(seq: Sequence) -> bool:
    """Whether the model's argmax alone decides `seq`'s next tokens (no sampling, penalties,
    biases, logprobs, min_tokens mask or grammar) and it has one sequence.

    NOTE: rows constrained by a grammar do not draft: verifying a draft would need a mask per
    draft position and a rollback of the matcher on rejection."""
    p = seq.request.params
    return (
        p.is_greedy
        and p.n == 1
        and p.logprobs is None
        and not p.logit_bias
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and p.grammar is None
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


@dataclass(slots=True)
class VerifiedDraft:
    entry: ScheduledSequence
    choices: list[int]  # the argmax of each of the entry's 1 + len(draft) rows


@dataclass(slots=True)
class DraftSplit:
    """A step's sampled rows, parted into entries sampled as usual and entries with a draft."""

    logits: torch.Tensor  # [len(sampled), vocab_size]: one row per plain entry
    sampled: list[int]  # indices into the step's entries, one per row of `logits`
    verified: list[VerifiedDraft]


class Speculator:
    """Decides which sequences carry a draft and what a verified draft yields.

    `num_tokens` is 0 where drafts cannot be verified (only the fused attention kernel reads
    several rows after a decode); drafts are proposed only while at most `max_seqs` sequences
    run, where a step is bound by reading the weights rather than by arithmetic.
    """

    def __init__(self, num_tokens: int, max_seqs: int, max_model_len: int) -> None:
        self.num_tokens = num_tokens
        self.max_seqs = max_seqs
        self.max_model_len = max_model_len
        self.num_draft_tokens = 0  # proposed since start
        self.num_accepted_tokens = 0  # of which the model confirmed

    def is_active(self, num_running: int) -> bool:
        return self.num_tokens > 0 and 0 < num_running <= self.max_seqs

    def propose(self, seq: Sequence, budget: int) -> list[int]:
        """Tokens to verify after `seq`'s next one: within the step's token `budget`, the
        context length and max_tokens (tokens past those would be dropped anyway)."""
        if not can_speculate(seq):
            return []
        room = min(self.num_tokens, budget, self.max_model_len - len(seq.token_ids))
        max_tokens = seq.request.params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - seq.num_generated_tokens - 1)
        return propose_draft(seq.token_ids, room)

    @staticmethod
    def split_rows(
        logits: torch.Tensor, sampled: list[int], scheduled: list[ScheduledSequence]
    ) -> DraftSplit:
        """Separate the rows of entries with a draft (see the row layout above) from the
        others' one row each."""
        plain_rows, plain, verified = [], [], []
        row = 0
        for i in sampled:
            entry = scheduled[i]
            if entry.draft:
                choices = logits[row : row + 1 + len(entry.draft)].max(dim=-1).indices.tolist()
                verified.append(VerifiedDraft(entry, choices))
            else:
                plain_rows.append(row)
                plain.append(i)
            row += 1 + len(entry.draft)
        return DraftSplit(logits[plain_rows], plain, verified)

    def accept(self, verified: VerifiedDraft, append_token: Callable[[Sequence, int], None]) -> int:
        """Append the tokens a verified draft yields, up to a stop, and return how many. The
        cache then holds K/V for all but the last of them (rows past the first wrong guess are
        simply overwritten later)."""
        seq, draft = verified.entry.seq, verified.entry.draft
        accepted = accepted_tokens(draft, verified.choices)
        num_appended = 0
        for token_id in accepted:
            append_token(seq, token_id)
            num_appended += 1
            if seq.is_finished:
                break
        seq.num_computed_tokens += num_appended - 1
        self.num_draft_tokens += len(draft)
        self.num_accepted_tokens += len(accepted) - 1
        return num_appended
