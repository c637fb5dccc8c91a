from migrate.ranges import Remaining


def test_take_walks_from_the_cursor_and_wraps() -> None:
    r = Remaining([(0, 100)])
    assert r.take(0, 10) == (0, 10)
    assert r.take(50, 10) == (50, 10)
    assert r.take(95, 10) == (95, 5)
    assert r.take(100, 10) == (10, 10)  # wrapped
    assert r.pages == 100 - 35


def test_discard_punches_holes_and_everything_is_sent_once() -> None:
    r = Remaining([(0, 1000)])
    r.discard(10, 5)
    r.discard(500, 600)
    r.discard(0, 1)
    seen = []
    cursor = 0
    while (run := r.take(cursor, 64)) is not None:
        seen.extend(range(run[0], run[0] + run[1]))
        cursor = 300 if len(seen) == 64 else run[0] + run[1]  # a jump, as after a request
    assert sorted(seen) == [p for p in range(1, 500) if not 10 <= p < 15]
    assert not r
