"""Budgeted best-so-far search over candidate prompts: each new prompt costs one evaluation (a round of
generation and scoring); the search stops at the budget or after `patience` evaluations without a gain."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator


@dataclass
class Score:
    """similarity: mean target-to-generated cosine; agreement: the domain classifier's (None without one);
    score: what the search maximises."""
    similarity: float
    agreement: float | None
    score: float
    agreement_parts: dict | None = field(default=None, kw_only=True)  # e.g. {"class": 1.0, "tint": 0.5}


@dataclass
class Proposal:
    strategy: str
    prompt: str
    choice: dict | None = None           # the attribute choice behind an attribute prompt
    extra: dict = field(default_factory=dict)


@dataclass(kw_only=True)
class Candidate(Proposal, Score):
    """An evaluated proposal."""
    evaluation: int                      # 1-based order of evaluation; duplicates share their original's
    duplicate_of: str | None = None      # another strategy already proposed this exact prompt

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}   # choice tuples: JSON lists


class PromptSearch:
    """Evaluates proposals lazily, in order, so a proposal generator can look at `best` (the argmax so far)."""

    def __init__(self, evaluate: Callable[[str], Score], budget: int, patience: int = 0, min_delta: float = 0.0):
        assert budget >= 1
        self.evaluate = evaluate
        self.budget, self.patience, self.min_delta = budget, patience, min_delta
        self.candidates: list[Candidate] = []
        self.evaluations = 0
        self.best: Candidate | None = None
        self.stopped = "exhausted"        # exhausted | budget | patience

    def run(self, proposals: Iterator[Proposal]) -> Candidate:
        """Consumes proposals until they run out, the budget is spent or patience runs out; returns the best."""
        seen: dict[str, Candidate] = {}
        stale = 0
        while True:
            # Check before pulling: producing a proposal can be costly (PEZ runs inside the generator).
            if self.evaluations >= self.budget:
                self.stopped = "budget"
                break
            if self.patience and stale >= self.patience:
                self.stopped = "patience"
                break
            proposal = next(proposals, None)
            if proposal is None:
                break
            if proposal.prompt in seen:
                first = seen[proposal.prompt]
                self.candidates.append(replace(first, **vars(proposal), duplicate_of=first.strategy))
                continue
            self.evaluations += 1
            candidate = Candidate(**vars(proposal), **vars(self.evaluate(proposal.prompt)), evaluation=self.evaluations)
            self.candidates.append(candidate)
            seen[proposal.prompt] = candidate
            gained = self.best is None or candidate.score > self.best.score + self.min_delta
            if self.best is None or candidate.score > self.best.score:
                self.best = candidate
            stale = 0 if gained else stale + 1
        assert self.best is not None, "the search evaluated nothing"
        return self.best
