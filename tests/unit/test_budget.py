"""Budget: a bounded wait for a shared quantity, then RESOURCE_EXHAUSTED with a time to retry after."""
import threading

import pytest

from persona.services.runtime.budget import Budget
from persona.services.runtime.errors import ResourceExhausted


def test_a_caller_beyond_the_queue_is_turned_away_with_advice():
    budget = Budget(1, queue=0, wait_s=10, what="slots", settings="PERSONA_X")
    with budget.hold():
        with pytest.raises(ResourceExhausted) as info:
            with budget.hold():
                pass
    assert info.value.retry_after_s >= 1 and "PERSONA_X" in info.value.message and "retry in" in info.value.message
    with budget.hold():  # free again
        assert budget.used == 1


def test_a_queued_caller_gets_the_budget_when_it_is_released():
    budget = Budget(100, queue=1, wait_s=60, what="pixels", settings="PERSONA_X")
    holding, got = threading.Event(), threading.Event()
    release = threading.Event()

    def first():
        with budget.hold(80):
            holding.set()
            release.wait()

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    held = []  # the waiter's hold, kept open (a dropped context manager would release it)

    def second():
        held.append(budget.hold(50))
        held[0].__enter__()
        got.set()

    waiter = threading.Thread(target=second)
    waiter.start()
    while budget.waiting == 0:  # the second caller queued behind the first
        threading.Event().wait(0.01)
    with pytest.raises(ResourceExhausted):  # the queue (1) is full
        with budget.hold(50):
            pass
    assert not got.is_set()
    release.set()
    waiter.join()
    thread.join()
    assert got.is_set() and budget.used == 50


def test_waiting_stops_when_the_caller_goes_away_or_the_wait_ends():
    budget = Budget(1, queue=5, wait_s=0.2, what="slots", settings="PERSONA_X")
    with budget.hold():
        with pytest.raises(ResourceExhausted, match="within 0.2 s"):
            with budget.hold():
                pass
        gone = Budget(1, queue=5, wait_s=60, what="slots", settings="PERSONA_X")
        with gone.hold():
            with pytest.raises(ResourceExhausted):
                with gone.hold(is_active=lambda: False):
                    pass
    assert budget.waiting == 0 and budget.used == 0
