"""pipeline/parallel/collective.py: an error rank 0 met reaches every rank as the same error."""

from __future__ import annotations

from pipeline.parallel.collective import _describe, _rebuild, on_rank0_all
from pipeline.tracking import TrackingUnavailable


def test_an_exception_whose_init_takes_other_arguments_is_rebuilt_with_type_message_and_attributes():
    original = TrackingUnavailable("server http://h:1 is unreachable", "start it")
    rebuilt = _rebuild(_describe(original), "start-up checks")
    assert type(rebuilt) is TrackingUnavailable
    assert str(rebuilt) == "server http://h:1 is unreachable; start it"
    assert rebuilt.problem == "server http://h:1 is unreachable"


def test_a_type_that_cannot_be_found_becomes_a_runtime_error_naming_the_step():
    rebuilt = _rebuild(("no.such.module", "Gone", "it broke", {}), "taking the lock")
    assert type(rebuilt) is RuntimeError and str(rebuilt) == "taking the lock: Gone: it broke"


def test_rank0_raises_its_own_exception_and_returns_values(world1):
    assert on_rank0_all(lambda: 42, "answer") == 42
    boom = ValueError("bad key 'x'")

    def fail():
        raise boom

    try:
        on_rank0_all(fail, "check")
    except ValueError as exc:
        assert exc is boom
    else:
        raise AssertionError("expected the ValueError")
