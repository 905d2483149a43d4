"""The distillation configs, with no code behind them: which prompts (`PromptConfig`), which
teacher and how to talk to it (`TeacherConfig`), and how replies are checked (`VerifyPolicy`).

`mlxcore.config` imports them from here, so a stage that only reads configs does not depend on
the prompt templates, the HTTP client or the answer parser (stage cache keys hash the modules a
stage imports: `tasks/caching.py`). `prompts.py`, `teacher.py` and `verify.py` re-export them.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlxcore.clients.secrets import KeyedEndpoint

CATEGORIES: tuple[str, ...] = ("math", "logic", "reasoning", "knowledge")
KINDS: dict[str, tuple[str, ...]] = {
    "math": ("arithmetic", "gcd_lcm", "linear", "percent"),
    "logic": ("syllogism", "ordering"),
    "reasoning": ("shopping", "inventory", "travel", "ages"),
    "knowledge": ("open",),
}
#: How a kind's answer is compared: "number" (exact, via Fraction), "choice" (yes / no /
#: cannot tell), "name" (case-insensitive), None (no ground truth).
ANSWER_TYPES: dict[str, str | None] = {
    **{k: "number" for k in KINDS["math"] + KINDS["reasoning"]},
    "syllogism": "choice",
    "ordering": "name",
    "open": None,
}
DEFAULT_WEIGHTS: dict[str, float] = {"math": 0.4, "logic": 0.2, "reasoning": 0.2, "knowledge": 0.2}


class PromptConfig(BaseModel):
    """Which categories to draw, how often, and the seed of the whole stream."""

    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    seed: int = 0

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, w: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(w) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; known: {list(CATEGORIES)}")
        bad = {k: v for k, v in w.items() if not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"weights must be finite and >= 0, got {bad}")
        if sum(w.values()) <= 0:
            raise ValueError("at least one category needs a positive weight")
        return w



class CategoryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verify: bool = True  # False: keep replies unchecked, marked verified=False
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(16_000, ge=1)


class VerifyPolicy(BaseModel):
    """Acceptance rules, one `CategoryPolicy` per category."""

    model_config = ConfigDict(extra="forbid")

    math: CategoryPolicy = Field(default_factory=CategoryPolicy)
    logic: CategoryPolicy = Field(default_factory=CategoryPolicy)
    reasoning: CategoryPolicy = Field(default_factory=CategoryPolicy)
    knowledge: CategoryPolicy = Field(default_factory=lambda: CategoryPolicy(min_chars=80, max_chars=8_000))
    reject_think_tags: bool = True  # a reply still holding <think> / </think> is rejected

    def for_category(self, category: str) -> CategoryPolicy:
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}")
        return getattr(self, category)



class TeacherConfig(KeyedEndpoint):

    url: str = "http://127.0.0.1:11434"
    model: str = "qwen3:0.6b"
    api: Literal["ollama", "openai"] = "ollama"
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)        # Ollama: options.num_predict
    workers: int = Field(4, ge=1)             # concurrent requests in imap_unordered
    timeout_s: float = Field(120, gt=0)       # per attempt (connect, read, write, pool)
    retries: int = Field(4, ge=0)             # extra attempts after the first
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(20, ge=0)
    # Give up when more than failure_budget of the last failure_window calls were UNRECOVERED
    # (retries exhausted, or not retryable); failed attempts that a retry recovered never count.
    failure_budget: int = Field(50, ge=0, description=(
        "Unrecovered teacher calls (retries exhausted, or a non-retryable error) tolerated among the last "
        "`failure_window` calls; one more and the teacher gives up (TeacherGaveUp). Failed attempts that a "
        "retry recovered never count."))
    failure_window: int = Field(200, ge=1, description="How many of the most recent calls the failure budget looks at.")
