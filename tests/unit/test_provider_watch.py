"""When calls that never reached the provider make an outage, and when it is over."""

from __future__ import annotations

from genworker.node.outage import PROBE_FIRST_S, PROBE_MAX_S, ProviderWatch


def test_five_unreachable_calls_in_a_row_are_an_outage_and_a_success_between_resets_them() -> None:
    w = ProviderWatch(failures=5)
    assert not any(w.unreachable("image") for _ in range(4))
    assert not w.succeeded("image")  # a success before the fifth: no outage, count again
    assert not any(w.unreachable("image") for _ in range(4))
    assert w.unreachable("image")
    assert w.down
    assert not w.unreachable("image")  # already down: started once


def test_only_a_success_of_a_kind_that_reached_for_the_provider_ends_it() -> None:
    w = ProviderWatch(failures=1)
    assert w.unreachable("image")
    assert not w.succeeded("noop")  # a noop job proves nothing about the provider
    assert w.down
    assert w.succeeded("image")
    assert not w.down


def test_the_pauses_between_probes_double_up_to_the_cap() -> None:
    w = ProviderWatch(failures=1)
    w.unreachable("image")
    pauses = [w.next_pause_s() for _ in range(6)]
    assert pauses[0] == PROBE_FIRST_S
    assert pauses == sorted(pauses)
    assert pauses[-1] == PROBE_MAX_S
