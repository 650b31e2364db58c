"""celery_dlock.deadline.call_before: a call ended on its deadline, on reused helper threads.

No Redis here: the calls are plain functions, so what is checked is the hand-off itself.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from celery_dlock.deadline import DeadlineExceeded, call_before


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_calls_one_after_another_reuse_one_helper_thread() -> None:
    seen: list[threading.Thread] = []  # kept alive, so no two threads share an id

    def who() -> int:
        seen.append(threading.current_thread())
        return len(seen)

    assert [call_before(soon(), who) for _ in range(50)] == list(range(1, 51))
    assert len({id(thread) for thread in seen}) == 1
    assert seen[0] is not threading.current_thread()


def test_a_call_past_its_deadline_is_given_up_and_its_late_result_handed_over() -> None:
    gate = threading.Event()
    late: list[object] = []
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        call_before(time.monotonic() + 0.2, lambda: gate.wait(10) and "late reply", late.append)
    assert 0.15 < time.monotonic() - started < 2
    # Meanwhile another call gets a helper of its own and is not held up.
    assert call_before(soon(), lambda: "other") == "other"
    assert late == []
    gate.set()
    deadline = time.monotonic() + 5
    while not late and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late == ["late reply"]


def test_an_error_of_the_call_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        call_before(soon(), fail)
    assert call_before(soon(), lambda: 7) == 7  # and the helper serves the next call


def test_threads_calling_at_once_each_get_an_answer_before_the_deadline() -> None:
    answers: dict[int, int] = {}

    def caller(index: int) -> None:
        for round_ in range(20):
            answers[index] = call_before(soon(), lambda n=index * 100 + round_: (time.sleep(0.001), n)[1])

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == {i: i * 100 + 19 for i in range(8)}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_helpers() -> None:
    """Helpers idle in the parent at the fork do not exist in the child."""
    assert call_before(soon(), lambda: 1) == 1  # leaves an idle helper behind
    pid = os.fork()
    if pid == 0:
        try:
            ok = call_before(time.monotonic() + 2, lambda: os.getpid()) == os.getpid()
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
