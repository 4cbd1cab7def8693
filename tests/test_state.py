"""The pure core: the transition table and how a parent's state follows its children."""

from __future__ import annotations

import pytest

from psjobs import JobState
from psjobs.core._state import TRANSITIONS, Event, derive_parent_state, next_state

S = JobState
FINISHED = [S.COMPLETED, S.FAILED, S.STOPPED]


def test_names_and_parse() -> None:
    assert str(S.NOT_STARTED) == "NotStarted"
    assert [s.value for s in S] == ["NotStarted", "Running", "Completed", "Failed", "Stopped", "Blocked",
                                    "Suspended", "Disconnected", "Suspending", "Stopping"]
    assert S.parse("completed") is S.COMPLETED and S.parse("not_started") is S.NOT_STARTED
    assert S.parse(S.RUNNING) is S.RUNNING
    with pytest.raises(ValueError, match="unknown job state"):
        S.parse("Done")
    assert {s for s in S if s.is_finished} == set(FINISHED)
    assert {s for s in S if s.is_persistent} == {*FINISHED, S.SUSPENDED, S.DISCONNECTED}


@pytest.mark.parametrize("state", FINISHED)
@pytest.mark.parametrize("event", list(Event))
def test_finished_states_absorb_every_event(state: JobState, event: Event) -> None:
    assert next_state(state, event) is state


def test_table_never_leaves_a_finished_state() -> None:
    assert not [k for k in TRANSITIONS if k[0].is_finished]


def test_main_paths() -> None:
    assert next_state(S.NOT_STARTED, Event.START) is S.RUNNING
    assert next_state(S.NOT_STARTED, Event.STOP) is S.STOPPED
    assert next_state(S.RUNNING, Event.STOP) is S.STOPPING
    for end in (Event.COMPLETE, Event.FAIL, Event.STOPPED):
        assert next_state(S.STOPPING, end) is S.STOPPED  # once stopped, however it ends
    assert next_state(S.RUNNING, Event.BLOCK) is S.BLOCKED
    assert next_state(S.BLOCKED, Event.UNBLOCK) is S.RUNNING
    assert next_state(S.RUNNING, Event.UNBLOCK) is S.RUNNING  # an event that does not apply is ignored


def test_parent_precedence() -> None:
    assert derive_parent_state([S.COMPLETED, S.COMPLETED], False) is S.COMPLETED
    assert derive_parent_state([S.FAILED, S.COMPLETED], False) is S.FAILED
    assert derive_parent_state([S.FAILED, S.STOPPED], True) is S.FAILED  # Failed beats Stopped
    assert derive_parent_state([S.COMPLETED, S.STOPPED], False) is S.STOPPED
    assert derive_parent_state([S.COMPLETED, S.COMPLETED], True) is S.STOPPED
    assert derive_parent_state([S.DISCONNECTED, S.FAILED], False) is S.DISCONNECTED
    assert derive_parent_state([S.RUNNING, S.BLOCKED], False) is S.BLOCKED
    assert derive_parent_state([S.NOT_STARTED, S.RUNNING], False) is S.RUNNING
    assert derive_parent_state([S.NOT_STARTED], False) is S.RUNNING  # a parent never shows NotStarted
    assert derive_parent_state([S.RUNNING, S.COMPLETED], True) is S.STOPPING
    assert derive_parent_state([S.SUSPENDED, S.COMPLETED], False) is S.SUSPENDED
    assert derive_parent_state([S.SUSPENDED, S.SUSPENDING], False) is S.SUSPENDING
    assert derive_parent_state([], False) is S.RUNNING
