"""Batched logits processing and sampling, with transformers' semantics for each processor."""

from __future__ import annotations

import torch

from engine.grammar import apply_bitmask, fill_bitmasks
from engine.outputs import TokenLogprob
from engine.request import Sequence

NEG_INF = float("-inf")


def apply_repetition_penalty(
    logits: torch.Tensor, token_ids: torch.Tensor, penalties: torch.Tensor
) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, per row.

    logits [rows, vocab]; token_ids [rows, max_len] (pad by repeating a real id of the row);
    penalties [rows]. Seen tokens' positive logits are divided by the penalty, negative ones
    multiplied.
    """
    seen = logits.gather(1, token_ids)
    p = penalties[:, None]
    return logits.scatter(1, token_ids, torch.where(seen < 0, seen * p, seen / p))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper, per row.

    top_k [rows] (the vocab size where off) keeps every token at least as likely as the k-th;
    top_p [rows] (1.0 where off) removes the least likely tokens whose total probability stays
    within 1 - top_p, always keeping the most likely one.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    kth_largest = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, NEG_INF)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p).unsqueeze(1)
    remove[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(remove, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """transformers' MinPLogitsWarper: drop tokens less likely than min_p x the top token's probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


class Sampler:
    """Chooses the next token of every row of a step's logits.

    The plain greedy batch is one argmax. Otherwise each processor runs on just the rows that
    use it, in transformers' order: repetition penalty, presence / frequency penalty, logit
    bias, min_tokens masking, the grammar masks of structured outputs, then for sampled rows temperature, top-k, top-p, min-p and a draw.
    A seeded sequence draws from its own torch.Generator, so its tokens do not depend on
    what else is in the batch.
    """

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits: float32 [len(seqs), vocab]. Returns token ids and per-row logprobs."""
        params = [s.request.params for s in seqs]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._process(logits, seqs)

        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        token_ids = logits.max(dim=-1).indices  # NOTE: 3x faster than argmax on CPU; same first-max tie rule
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            token_ids[rows] = self._draw(logits[rows], [seqs[i] for i in sampled_rows])
        tokens = token_ids.tolist()
        if raw_logprobs is None:
            return tokens, [None] * len(seqs)
        return tokens, _logprobs(raw_logprobs, token_ids, params)

    def _process(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.request.params for s in seqs]
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rows:
            ids = _padded([seqs[i].token_ids for i in rows])
            penalties = torch.tensor([params[i].repetition_penalty for i in rows])
            logits[rows] = apply_repetition_penalty(logits[rows], ids, penalties)

        rows = [
            i
            for i, p in enumerate(params)
            if (p.presence_penalty or p.frequency_penalty) and seqs[i].num_generated_tokens
        ]
        if rows:
            outputs = [seqs[i].generated_token_ids for i in rows]
            counts = torch.zeros(len(rows), logits.shape[1])
            counts.scatter_add_(1, _padded(outputs), _padding_weights(outputs))
            presence = torch.tensor([params[i].presence_penalty for i in rows])[:, None]
            frequency = torch.tensor([params[i].frequency_penalty for i in rows])[:, None]
            logits[rows] -= frequency * counts + presence * (counts > 0)

        bias_rows, bias_ids, bias_values = [], [], []
        for i, p in enumerate(params):
            for token_id, bias in p.logit_bias.items():
                bias_rows.append(i)
                bias_ids.append(token_id)
                bias_values.append(bias)
        if bias_rows:
            logits.index_put_(
                (torch.tensor(bias_rows), torch.tensor(bias_ids)), torch.tensor(bias_values), accumulate=True
            )

        for i, (seq, p) in enumerate(zip(seqs, params)):
            if seq.num_generated_tokens < p.min_tokens:
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                logits[i, banned] = NEG_INF

        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if rows:
            bitmasks = fill_bitmasks([seqs[i].grammar for i in rows], logits.shape[1])
            apply_bitmask(logits, bitmasks, rows)
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.request.params for s in seqs]
        logits = logits / torch.tensor([p.temperature for p in params]).unsqueeze(1)
        vocab = logits.shape[1]
        top_k = torch.tensor([min(p.top_k, vocab) if p.top_k else vocab for p in params])
        top_p = torch.tensor([p.top_p for p in params])
        if bool((top_k < vocab).any() or (top_p < 1.0).any()):
            logits = apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params]))
        probs = logits.softmax(dim=-1)
        # argmax(p / E) with E ~ Exp(1) draws index i with probability p_i (an exponential race).
        noise = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[row].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)


def _padded(rows: list[list[int]]) -> torch.Tensor:
    """Rows of ids padded to one length by repeating each row's first id, [len(rows), max_len]."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [r[0]] * (width - len(r)) for r in rows])


def _padding_weights(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])


def _logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, params: list
) -> list[TokenLogprob | None]:
    max_top = max(p.logprobs or 0 for p in params)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (None, None)
    result: list[TokenLogprob | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        top = []
        if p.logprobs:
            top = list(zip(top_ids[i, : p.logprobs].tolist(), top_values[i, : p.logprobs].tolist()))
            # Equal logprobs in token id order, as the greedy choice breaks ties (topk does not).
            top.sort(key=lambda entry: (-entry[1], entry[0]))
        result.append(TokenLogprob(int(token_ids[i]), chosen[i], top))
    return result


def score_tokens(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprob]:
    """Each given token's raw log-probability under its row of `logits` [n, vocab], its rank,
    and the `num_top` most likely tokens (ties in token id order): prompt_logprobs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids).unsqueeze(1)  # [n, 1]
    chosen = logprobs.gather(1, ids)  # [n, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (None, None)
    scored = []
    for i, (token_id, logprob) in enumerate(zip(token_ids, chosen.squeeze(1).tolist())):
        top = []
        if num_top:
            top = sorted(zip(top_ids[i].tolist(), top_values[i].tolist()), key=lambda e: (-e[1], e[0]))
        scored.append(TokenLogprob(token_id, logprob, top, ranks[i]))
    return scored
