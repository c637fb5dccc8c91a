"""Which failures count as a lost link: only link errors, never a bug beside them."""

from migrate.errors import PeerError, RemoteProtocolError, UffdError, lost_link


def test_only_link_errors_make_a_lost_link() -> None:
    """A bug next to a lost link in one exception group is raised, never taken for a reconnect."""
    gone, bad = PeerError("gone"), RemoteProtocolError("bad frame")
    assert lost_link(ExceptionGroup("", [gone, ExceptionGroup("", [bad])])) is gone
    assert lost_link(gone) is gone
    assert lost_link(ExceptionGroup("", [gone, UffdError("UFFDIO_COPY", 22)])) is None
    assert lost_link(ExceptionGroup("", [gone, KeyError("bug")])) is None
    assert lost_link(ValueError("bug")) is None
