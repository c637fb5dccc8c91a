from migrate.ranges import Remaining


def test_take_walks_windows_from_the_cursor_and_wraps() -> None:
    r = Remaining([(0, 100)])
    assert r.take(0, 10) == [(0, 10)]
    assert r.take(50, 10) == [(50, 10)]
    assert r.take(95, 10) == [(95, 5)]
    assert r.take(100, 10) == [(10, 10)]  # wrapped
    assert r.pages == 100 - 35


def test_a_window_skips_holes_in_one_take() -> None:
    r = Remaining([(0, 100)])
    r.discard(3, 2)
    r.discard(7, 1)
    assert r.take(0, 10) == [(0, 3), (5, 2), (8, 2)]
    assert r.take(0, 10) == [(10, 10)]


def test_discard_punches_holes_and_everything_is_sent_once() -> None:
    r = Remaining([(0, 1000)])
    r.discard(10, 5)
    r.discard(500, 600)
    r.discard(0, 1)
    seen: list[int] = []
    cursor = 0
    while runs := r.take(cursor, 64):
        for start, count in runs:
            seen.extend(range(start, start + count))
        cursor = 300 if len(seen) <= 64 else runs[-1][0] + runs[-1][1]  # a jump, as after a request
    assert sorted(seen) == [p for p in range(1, 500) if not 10 <= p < 15]
    assert len(seen) == len(set(seen))
    assert not r


def test_take_after_and_before_go_outward_without_wrapping() -> None:
    r = Remaining([(0, 100)])
    r.discard(40, 20)  # [0, 40) and [60, 100) left
    assert r.take_after(50, 5) == [(60, 5)]  # the first page left at or after 50
    assert r.take_before(50, 5) == [(35, 5)]  # the last pages left below 50
    assert r.take_before(36, 10) == [(25, 10)]
    assert r.take_after(98, 10) == [(98, 2)]
    assert r.take_after(100, 10) == []  # nothing after: no wrap
    assert r.take_before(0, 10) == []
    r.discard(10, 5)
    assert r.take_before(25, 20) == [(5, 5), (15, 10)]  # one window across a hole, in address order


def test_take_pages_counts_pages_not_address_span() -> None:
    """A sparse set (a working set) goes out a number of pages at a time, however far apart they lie."""
    r = Remaining([(0, 3), (1000, 2), (5000, 4), (9000, 10)])
    assert r.take_pages(0, 6) == [(0, 3), (1000, 2), (5000, 1)]
    assert r.take_pages(5001, 100) == [(5001, 3), (9000, 10)]
    assert not r


def test_take_pages_wraps_and_runs_lists_what_is_left() -> None:
    r = Remaining([(10, 5), (100, 5)])
    assert r.take_pages(50, 7) == [(100, 5), (10, 2)]
    assert r.runs() == [(12, 3)]
