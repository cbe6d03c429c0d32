"""Budgeted best-so-far search over candidate prompts: each new prompt costs one evaluation (a round of
generation and scoring); the search stops at the budget or after `patience` evaluations without a gain."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator


@dataclass
class Score:
    """similarity: mean target-to-generated cosine; agreement: the domain classifier's (None without one);
    score: what the search maximises."""
    similarity: float
    agreement: float | None
    score: float
    agreement_parts: dict | None = None  # e.g. {"class": 1.0, "tint": 0.5}


@dataclass
class Candidate:
    strategy: str
    prompt: str
    similarity: float
    agreement: float | None
    score: float
    evaluation: int                      # 1-based order of evaluation; duplicates share their original's
    duplicate_of: str | None = None      # another strategy already proposed this exact prompt
    choice: dict | None = None           # the attribute choice behind an attribute prompt
    extra: dict = field(default_factory=dict)
    agreement_parts: dict | None = None

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        if out.get("choice"):
            out["choice"] = {g: list(v) for g, v in out["choice"].items()}
        return out


@dataclass
class Proposal:
    strategy: str
    prompt: str
    choice: dict | None = None
    extra: dict = field(default_factory=dict)


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
                self.candidates.append(Candidate(
                    proposal.strategy, proposal.prompt, first.similarity, first.agreement, first.score,
                    first.evaluation, duplicate_of=first.strategy, choice=proposal.choice, extra=proposal.extra,
                    agreement_parts=first.agreement_parts))
                continue
            result = self.evaluate(proposal.prompt)
            self.evaluations += 1
            candidate = Candidate(proposal.strategy, proposal.prompt, result.similarity, result.agreement,
                                  result.score, self.evaluations, choice=proposal.choice, extra=proposal.extra,
                                  agreement_parts=result.agreement_parts)
            self.candidates.append(candidate)
            seen[proposal.prompt] = candidate
            gained = self.best is None or candidate.score > self.best.score + self.min_delta
            if self.best is None or candidate.score > self.best.score:
                self.best = candidate
            stale = 0 if gained else stale + 1
        assert self.best is not None, "the search evaluated nothing"
        return self.best
