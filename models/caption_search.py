"""Caption decoding strategies over the caption decoder's KV cache: greedy, beam search and nucleus sampling.

Follows transformers' generate(): CTRL's repetition penalty, min/max length, length-normalised beam scores
(Wu et al. 2016 without the +5 smoothing), top-p sampling (Holtzman et al. 2019). Batched over images;
tokens stay in the decoder's reduced vocabulary until `to_token_ids` at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from configs.errors import UserError


@dataclass
class CaptionOptions:
    """How to decode. Lengths count every token, [CLS] and [SEP] included (transformers' convention);
    max_length None is the model's max_caption_len (and never more)."""
    num_beams: int = 1
    max_length: int | None = None
    min_length: int = 0               # [SEP] is forbidden while the caption is shorter than this
    do_sample: bool = False
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0   # > 1 discourages tokens the caption already holds
    length_penalty: float = 1.0       # beam score = log-likelihood / generated_length ** length_penalty
    use_cache: bool = True            # False recomputes the whole prefix each step (the benchmark's baseline)

    def check(self, decoder_max_len: int) -> "CaptionOptions":
        """Raises UserError for a value the decoder cannot honour; returns self."""
        if self.num_beams < 1:
            raise UserError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise UserError("choose beam search (num_beams > 1) or sampling (do_sample), not both")
        if self.max_length is not None and not 2 <= self.max_length <= decoder_max_len:
            raise UserError(f"max_length must be between 2 and the model's max_caption_len ({decoder_max_len}), "
                            f"got {self.max_length}")
        if self.min_length < 0:
            raise UserError(f"min_length must be >= 0, got {self.min_length}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


class DecoderState:
    """The decoder run one position at a time, with its KV cache or (use_cache=False) recomputing the prefix."""

    def __init__(self, decoder, memory: torch.Tensor, use_cache: bool):
        self.decoder, self.memory, self.use_cache = decoder, memory, use_cache
        self.cache = None

    def logits(self, vocab: torch.Tensor) -> torch.Tensor:
        """vocab (N, t), the whole prefix so far -> next-token logits (N, V)."""
        if not self.use_cache:
            return self.decoder(vocab, self.memory)[:, -1]
        logits, self.cache = self.decoder.step(vocab[:, -1:], self.memory, self.cache, vocab.shape[1] - 1)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps rows `index` (N,) of the cache (beams that survived), in that order. Beam search never moves a
        row to another image, and an image's beams share its memory, so the memory stays as it is."""
        if self.cache is not None:
            self.cache = self.decoder.reorder_cache(self.cache, index)


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL's penalty: logits (N, V) of tokens already generated (seen (N, V) bool) move towards 'unlikely'."""
    if seen is None or penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


class LogitRules:
    """Raw logits -> the processed log-probabilities every strategy picks and scores with: repetition penalty,
    [CLS]/[PAD] never, [SEP] not before min_length. Also names the special tokens in vocabulary indices."""

    def __init__(self, decoder, options: CaptionOptions, device: torch.device):
        self.bos, self.eos, self.pad = (int(decoder.vocab_index[i])
                                        for i in (decoder.bos_id, decoder.eos_id, decoder.pad_id))
        self.vocab_size, self.options = decoder.head.out_features, options
        # Training never targets [CLS] or [PAD]; an undertrained decoder can still rank them first.
        self.never = torch.zeros(self.vocab_size, device=device)
        self.never[[self.bos, self.pad]] = float("-inf")
        self.too_short = self.never.clone()
        self.too_short[self.eos] = float("-inf")

    def log_probs(self, logits: torch.Tensor, seen: torch.Tensor | None, length: int) -> torch.Tensor:
        """logits (N, V) for the token after a prefix of `length` tokens -> log-probabilities (N, V)."""
        logits = penalise_repeats(logits.float(), seen, self.options.repetition_penalty)
        # length + 1: the prefix with [SEP] appended, which must reach min_length.
        bias = self.too_short if length + 1 < self.options.min_length else self.never
        return torch.log_softmax(logits + bias, dim=-1)

    def new_seen(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """(rows, V) bool of tokens generated so far, for the repetition penalty; None when it is off."""
        if self.options.repetition_penalty == 1.0:
            return None
        return torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=device)


def sample_top_p(log_probs: torch.Tensor, top_p: float, temperature: float,
                 generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of log_probs (N, V) from the smallest set whose mass reaches top_p; row i draws its one
    uniform number from generators[i], so a row's draw does not depend on the rest of the batch."""
    probs = torch.softmax(log_probs / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    # Keep a token while the mass before it is below top_p (so the most likely token always stays).
    sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs >= top_p, 0.0)
    cumulative = sorted_probs.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(probs.device)
    u = u * cumulative[:, -1]                                                # (N,) within the kept mass
    rank = torch.searchsorted(cumulative, u[:, None], right=True).clamp(max=probs.shape[-1] - 1)
    return order.gather(-1, rank).squeeze(-1)                                # (N,)


@torch.no_grad()
def decode_captions(decoder, image_tokens: torch.Tensor, options: CaptionOptions,
                    generators: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """image_tokens (B, M, D) -> (tokenizer ids (B, L) starting with [CLS], padded after [SEP];
    scores (B,): the sum of the chosen tokens' processed log-probabilities, divided by
    generated_length ** length_penalty for beam search).

    Sampling needs `generators`, one per image."""
    options.check(decoder.max_len)
    if options.num_beams > 1:
        return best_of_beam_and_greedy(decoder, image_tokens, options)
    if options.do_sample and (generators is None or len(generators) != image_tokens.shape[0]):
        raise ValueError("sampling needs one torch.Generator per image")
    return sample_or_greedy(decoder, image_tokens, options, generators if options.do_sample else None)


def sample_or_greedy(decoder, image_tokens: torch.Tensor, options: CaptionOptions,
                     generators: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (generators None) or nucleus sampling; returns token ids (B, L) and log-likelihoods (B,)."""
    B, device = image_tokens.shape[0], image_tokens.device
    max_length = options.max_length or decoder.max_len
    state = DecoderState(decoder, decoder.memory(image_tokens), options.use_cache)
    rules = LogitRules(decoder, options, device)
    vocab = torch.full((B, max_length), rules.pad, dtype=torch.long, device=device)
    vocab[:, 0] = rules.bos
    seen = rules.new_seen(B, device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    scores = torch.zeros(B, device=device)
    length = 1
    while length < max_length and not done.all():
        log_probs = rules.log_probs(state.logits(vocab[:, :length]), seen, length)
        if generators is None:
            next_token = log_probs.argmax(-1)
        else:
            next_token = sample_top_p(log_probs, options.top_p, options.temperature, generators)
        scores += log_probs.gather(-1, next_token[:, None]).squeeze(-1).masked_fill(done, 0.0)
        next_token = next_token.masked_fill(done, rules.pad)                # (B,)
        if seen is not None:
            seen.scatter_(1, next_token[:, None], True)
        vocab[:, length] = next_token
        done |= next_token == rules.eos
        length += 1
    return decoder.to_token_ids(vocab[:, :length]), scores


def best_of_beam_and_greedy(decoder, image_tokens: torch.Tensor,
                            options: CaptionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search, falling back per image on the greedy caption when that scores higher: on flat distributions
    pruning can drop the greedy path (seen on untrained decoders), and one more beam's work rules it out."""
    beam_ids, beam_scores = beam_search(decoder, image_tokens, options)
    greedy_ids, greedy_ll = sample_or_greedy(decoder, image_tokens, options, None)
    generated = ((greedy_ids != decoder.pad_id) & (greedy_ids != decoder.bos_id)).sum(1)   # [SEP] counts
    greedy_scores = greedy_ll / generated.clamp(min=1).float() ** options.length_penalty
    use_greedy = greedy_scores > beam_scores
    if not use_greedy.any():
        return beam_ids, beam_scores
    width = max(beam_ids.shape[1], greedy_ids.shape[1])
    greedy_ids = F.pad(greedy_ids, (0, width - greedy_ids.shape[1]), value=decoder.pad_id)
    beam_ids = F.pad(beam_ids, (0, width - beam_ids.shape[1]), value=decoder.pad_id)
    ids = torch.where(use_greedy[:, None], greedy_ids, beam_ids)
    return ids, torch.where(use_greedy, greedy_scores, beam_scores)


def beam_search(decoder, image_tokens: torch.Tensor, options: CaptionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """num_beams hypotheses per image, ranked by length-normalised log-likelihood; returns the best per image:
    token ids (B, L) and its normalised score (B,)."""
    B, K, device = image_tokens.shape[0], options.num_beams, image_tokens.device
    max_length = options.max_length or decoder.max_len
    rules = LogitRules(decoder, options, device)
    V, eos, pad = rules.vocab_size, rules.eos, rules.pad
    memory = decoder.memory(image_tokens).repeat_interleave(K, dim=0)      # (B*K, M, C)
    state = DecoderState(decoder, memory, options.use_cache)
    vocab = torch.full((B * K, 1), rules.bos, dtype=torch.long, device=device)
    seen = rules.new_seen(B * K, device)
    # Only beam 0 is live at the start, so the first step does not pick the same token K times.
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    done = [False] * B

    def normalised(score: float, length: int) -> float:
        return score / (length - 1) ** options.length_penalty             # length - 1: [CLS] is not generated

    while vocab.shape[1] < max_length and not all(done):
        length = vocab.shape[1]
        log_probs = rules.log_probs(state.logits(vocab), seen, length)
        candidates = (beam_scores.view(B * K, 1) + log_probs).view(B, K * V)
        # 2K candidates: even if K of them end with [SEP], K live ones remain.
        top_scores, top_index = candidates.topk(2 * K, dim=-1)              # (B, 2K)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        # Dead rows (an image that is done, or fewer than K live candidates) get score -inf and [PAD].
        next_scores = [[float("-inf")] * K for _ in range(B)]
        next_beam = [[0] * K for _ in range(B)]
        next_token = [[pad] * K for _ in range(B)]
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for score, index in zip(top_scores[b], top_index[b]):
                beam, token = divmod(index, V)
                if score == float("-inf"):
                    break
                if token == eos:
                    sequence = torch.cat([vocab[b * K + beam], vocab.new_tensor([eos])])
                    finished[b].append((normalised(score, length + 1), sequence))
                    continue
                next_scores[b][kept], next_beam[b][kept], next_token[b][kept] = score, beam, token
                kept += 1
                if kept == K:
                    break
            finished[b] = sorted(finished[b], key=lambda item: -item[0])[:K]
            # transformers' early_stopping=False heuristic: stop once the best live beam, normalised at its
            # current length, cannot beat the worst of K finished hypotheses.
            if len(finished[b]) == K and (kept == 0 or normalised(next_scores[b][0], length + 1)
                                          <= finished[b][-1][0]):
                done[b] = True
        next_scores = torch.tensor(next_scores, device=device)             # (B, K)
        next_token = torch.tensor(next_token, device=device)               # (B, K)
        flat_beam = (torch.arange(B, device=device)[:, None] * K
                     + torch.tensor(next_beam, device=device)).view(-1)    # (B*K,)
        state.reorder(flat_beam)
        if seen is not None:
            seen = seen.index_select(0, flat_beam).scatter_(1, next_token.view(-1, 1), True)
        vocab = torch.cat([vocab.index_select(0, flat_beam), next_token.view(-1, 1)], dim=1)
        beam_scores = next_scores
    best_sequences, best_scores = [], []
    for b in range(B):
        if not done[b]:  # ran into max_length: live beams count as (unfinished) hypotheses
            for k in range(K):
                if beam_scores[b, k] > float("-inf"):
                    finished[b].append((normalised(beam_scores[b, k].item(), vocab.shape[1]), vocab[b * K + k]))
        score, sequence = max(finished[b], key=lambda item: item[0])
        best_sequences.append(sequence)
        best_scores.append(score)
    width = max(len(s) for s in best_sequences)
    out = torch.full((B, width), pad, dtype=torch.long, device=device)
    for b, sequence in enumerate(best_sequences):
        out[b, :len(sequence)] = sequence
    return decoder.to_token_ids(out), torch.tensor(best_scores, device=device)


def sequence_log_likelihood(decoder, image_tokens: torch.Tensor, token_ids: torch.Tensor,
                            options: CaptionOptions | None = None) -> torch.Tensor:
    """Teacher-forced sum of processed log-probabilities (B,) of captions token_ids (B, L) (as decode_captions
    returns them: [CLS] first, pads after [SEP]); lets callers compare strategies on one scale."""
    rules = LogitRules(decoder, options or CaptionOptions(), token_ids.device)
    vocab = decoder.to_vocab(token_ids)
    B, L = vocab.shape
    logits = decoder(vocab[:, :-1], decoder.memory(image_tokens))           # (B, L-1, V)
    seen = rules.new_seen(B, vocab.device)
    alive = torch.ones(B, dtype=torch.bool, device=vocab.device)
    total = torch.zeros(B, device=vocab.device)
    for t in range(L - 1):
        log_probs = rules.log_probs(logits[:, t], seen, t + 1)
        token = vocab[:, t + 1]
        total += log_probs.gather(-1, token[:, None]).squeeze(-1).masked_fill(~alive, 0.0)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        alive &= (token != rules.eos) & (token != rules.pad)
    return total
