"""Prices and costs. USD is a float for headers and Prometheus counters; what budgets count is an
integer number of micro-dollars, from integer per-token rates fixed once per Policy, so sums never
drift. An estimate (what is reserved) rounds up; an actual cost rounds to the nearest micro-dollar.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierwise.api.tier import Pricing

PER_MILLION = 1_000_000
MICROS_PER_USD = 1_000_000
# Rates are pico-dollars per token: a price per million tokens given to six decimals is exact.
PICO_PER_MICRO = 1_000_000


@dataclass(frozen=True, slots=True)
class Rates:
    """A backend's prices in pico-dollars per token."""

    input: int
    output: int
    cached: int

    @classmethod
    def of(cls, p: Pricing) -> Rates:
        cached = p.input_per_million if p.cached_input_per_million is None else p.cached_input_per_million
        return cls(round(p.input_per_million * PER_MILLION), round(p.output_per_million * PER_MILLION),
                   round(cached * PER_MILLION))  # fmt: skip


def cost_micros(
    rates: Rates, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0, *, up: bool = False
) -> int:
    """Micro-dollars of a usage: rounded up for an upper bound, to the nearest for an actual cost."""
    # Clamped by a comparison, not max(): priced several times per request.
    fresh = input_tokens - cached_input_tokens if input_tokens > cached_input_tokens else 0
    pico = fresh * rates.input + cached_input_tokens * rates.cached + output_tokens * rates.output
    if up:
        return -(-pico // PICO_PER_MICRO)
    return (pico + PICO_PER_MICRO // 2) // PICO_PER_MICRO


def cost_usd(pricing: Pricing, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
    """USD for a usage, with prompt-cache hits at the cached price (the input price when unset)."""
    cached_price = pricing.cached_input_per_million
    if cached_price is None:
        cached_price = pricing.input_per_million
    fresh = input_tokens - cached_input_tokens if input_tokens > cached_input_tokens else 0
    return (
        fresh * pricing.input_per_million
        + cached_input_tokens * cached_price
        + output_tokens * pricing.output_per_million
    ) / PER_MILLION


def usd(value: float) -> str:
    return f"{value:.8f}"


def micros_usd(micros: int) -> str:
    """Micro-dollars as a USD amount with six decimals, exactly."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def usd_micros(value: float) -> int:
    """A USD amount from the API (a limit) in micro-dollars."""
    return round(value * MICROS_PER_USD)
