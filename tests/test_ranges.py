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
