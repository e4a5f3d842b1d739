"""The book of a sidecar's allowance slices: what a request may take locally, who asks Redis for
more, when slices are topped up, given back and renewed."""

from __future__ import annotations

from tests.budgetcases import rule
from tierwise.budgetrules import ZERO, Amount
from tierwise.periods import window
from tierwise_sidecar.budgets.ledger import Line, Reservation
from tierwise_sidecar.budgets.slices import IDLE_SECONDS, ROUND_TRIPS, SLICE_REQUESTS, Slices

NOW = 1_800_000_000.0
ASK = Amount(1_000, 10)
LEASE = 60.0


def _line(name: str = "b", ask: Amount = ASK) -> Line:
    r = rule(name)
    return Line(r, window(r.period, r.time_zone, NOW), ask)


def _granted(book: Slices, lines: list[Line], extra: Amount, now: float = NOW) -> Reservation:
    asks = book.asks(lines, now, LEASE)
    r = Reservation("r", tuple(lines), now + LEASE, remote=True, leases=tuple(lease for lease, _ in asks))
    book.granted(r, asks, [extra] * len(lines), now, LEASE)
    return r


def test_nothing_is_taken_locally_before_a_grant_and_one_request_at_a_time_asks_for_more() -> None:
    book = Slices()
    line = _line()
    assert book.take([line], NOW, LEASE) is None
    first = book.asks([line], NOW, LEASE)
    second = book.asks([line], NOW, LEASE)
    assert first[0][0] == second[0][0], "one lease per budget"
    assert first[0][1] == Amount(ASK.micros * SLICE_REQUESTS, ASK.tokens * SLICE_REQUESTS)
    assert second[0][1] == ZERO, "a grant asking for more is on its way"


def test_a_grant_is_taken_from_until_it_runs_out_and_low_slices_are_topped_up_once() -> None:
    book = Slices()
    line = _line()
    _granted(book, [line], Amount(ASK.micros * 3, ASK.tokens * 3))
    taken = [book.take([line], NOW + i, LEASE) for i in range(4)]
    assert all(t is not None for t in taken[:3]) and taken[3] is None
    first = taken[0]
    assert first is not None and first.remote and len(first.leases) == 1
    low = list(book.due)
    assert len(low) == 1, "below half of SLICE_REQUESTS asks: due for a top-up, once"
    s, _ = low[0]
    book.topped(s, Amount(ASK.micros, ASK.tokens), NOW + 4, LEASE)
    assert book.take([line], NOW + 4, LEASE) is not None


def test_all_budgets_or_none() -> None:
    book = Slices()
    team, platform = _line("team"), _line("platform")
    _granted(book, [team], Amount(ASK.micros * 4, ASK.tokens * 4))
    assert book.take([team, platform], NOW, LEASE) is None
    assert book.take([team], NOW, LEASE) is not None, "nothing was taken from team by the refused take"
    assert next(s for s in book if s.rule.key == "apps/team").free == Amount(ASK.micros * 3, ASK.tokens * 3)


def test_a_slice_near_its_lease_end_is_not_used_and_one_past_it_gets_a_new_lease() -> None:
    book = Slices()
    line = _line()
    r = _granted(book, [line], Amount(ASK.micros * 4, ASK.tokens * 4))
    assert book.take([line], NOW + LEASE * 0.6, LEASE) is None, "less than half a lease left"
    assert [s.lease for s in book.to_renew(NOW + LEASE * 0.3)] == [r.leases[0]]
    assert book.asks([line], NOW + LEASE + 1, LEASE)[0][0] != r.leases[0]


def test_refused_and_idle_slices_give_back_what_is_free() -> None:
    book = Slices()
    line = _line()
    r = _granted(book, [line], Amount(ASK.micros * 4, ASK.tokens * 4))
    assert book.take([line], NOW, LEASE) is not None
    assert book.idle(NOW + IDLE_SECONDS / 2) == []
    back = book.idle(NOW + IDLE_SECONDS)
    assert [(s.lease, amount) for s, amount in back] == [(r.leases[0], Amount(ASK.micros * 3, ASK.tokens * 3))]
    book.settled(r)
    book.settled(Reservation("x", (line,), NOW, remote=True, leases=r.leases))
    assert book.idle(NOW + IDLE_SECONDS) == [] and len(book) == 0, "empty and idle: dropped"
    r = _granted(book, [line], Amount(ASK.micros * 2, ASK.tokens * 2))
    asks = book.asks([line], NOW, LEASE)
    assert [amount for _, amount in book.refused(asks)] == [Amount(ASK.micros * 2, ASK.tokens * 2)]


def test_what_lands_for_a_slice_given_back_meanwhile_is_given_back_too() -> None:
    book = Slices()
    line = _line()
    r = _granted(book, [line], Amount(ASK.micros * 4, ASK.tokens * 4))
    taken = book.take([line], NOW, LEASE)
    assert taken is not None
    s = next(iter(book))
    book.settled(taken)
    book.settled(r)
    # A refusal gives the free part back and drops the slice (nothing held) while the top-up flies.
    asks = book.asks([line], NOW, LEASE)
    assert book.refused(asks) and len(book) == 0
    assert book.topped(s, Amount(5, 5), NOW, LEASE) == Amount(5, 5), "not kept by a slice nobody has"
    # A grant whose slice went meanwhile (another request's refusal gave its free part back, and
    # the grant's own ask is not counted as held until it lands): its extra is handed back too.
    book.settled(_granted(book, [line], Amount(ASK.micros * 2, ASK.tokens * 2)))
    asks = book.asks([line], NOW, LEASE)
    assert book.refused(asks) and len(book) == 0
    granted = Reservation("g", (line,), NOW + LEASE, remote=True, leases=tuple(lease for lease, _ in asks))
    assert book.granted(granted, asks, [Amount(7, 7)], NOW, LEASE) == [(line.rule, asks[0][0], Amount(7, 7))]


def test_a_busy_slice_covers_its_takes_over_several_round_trips_to_redis() -> None:
    book = Slices()
    line = _line()
    big = Amount(ASK.micros * 1000, ASK.tokens * 1000)
    _granted(book, [line], big)
    # 400 requests a second for a second, each reserved from the slice and settled at once.
    for i in range(400):
        taken = book.take([line], NOW + i / 400, LEASE)
        assert taken is not None
        book.settled(taken)
    book.timed(0.05)  # a round trip to Redis takes 50 ms under this load
    book.asks([line], NOW + 1, LEASE)
    (s,) = list(book)
    # 400/s x 50 ms = 20 takes per round trip: ROUND_TRIPS of them, not SLICE_REQUESTS.
    assert ROUND_TRIPS * 20 * 0.9 <= s.target.micros / ASK.micros <= ROUND_TRIPS * 20 * 1.1
    assert s.target.micros / ASK.micros > SLICE_REQUESTS
    # A quiet slice aims no higher than before.
    quiet = Slices()
    _granted(quiet, [line], ZERO)
    assert quiet.asks([line], NOW + 5, LEASE)[0][1].micros <= ASK.micros * SLICE_REQUESTS
