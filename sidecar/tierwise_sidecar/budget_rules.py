"""Budget decisions, pure: which budgets count a request, where their spend stands against their
thresholds, what happens to the request, and how that is told to the caller."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class BudgetNote:
    """What the budget stage did to a request, for its response headers."""

    headers_out: dict[str, str] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return self.headers_out
