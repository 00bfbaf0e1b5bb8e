"""Restart decisions (pure): policies, the max, and the doubling backoff with its ceiling."""

from __future__ import annotations

from edge_agent.policy import decide_restart

ALWAYS = {"policy": "always", "max": None, "backoff": 1.0, "max_backoff": 5.0}


def test_backoff_doubles_up_to_the_ceiling() -> None:
    delays = [decide_restart(ALWAYS, failed=True, restarts=n, failures=n + 1).delay
              for n in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_ceiling_below_backoff_means_no_growth() -> None:
    rule = {**ALWAYS, "backoff": 3.0, "max_backoff": 1.0}
    assert [decide_restart(rule, failed=True, restarts=n, failures=n + 1).delay
            for n in range(3)] == [3.0, 3.0, 3.0]


def test_policies_and_max() -> None:
    never = {**ALWAYS, "policy": "never"}
    on_failure = {**ALWAYS, "policy": "on-failure", "max": 2}
    assert not decide_restart(never, failed=True, restarts=0, failures=1).restart
    assert not decide_restart(on_failure, failed=False, restarts=0, failures=0).restart
    assert decide_restart(on_failure, failed=True, restarts=1, failures=2).restart
    last = decide_restart(on_failure, failed=True, restarts=2, failures=3)
    assert not last.restart and "max 2" in last.why
    assert decide_restart(ALWAYS, failed=False, restarts=7, failures=0).delay == 1.0
