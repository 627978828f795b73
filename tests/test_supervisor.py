"""The launcher's restart policy, against a fake launcher (the real one is exercised end to end in
tests/test_replica_failure.py)."""
from __future__ import annotations

from cluster.launcher import Supervisor


class FakeLauncher:
    def __init__(self, *ids: str) -> None:
        self.exit_codes: dict[str, int | None] = dict.fromkeys(ids)
        self.started: list[str] = []

    def dead(self) -> dict[str, int]:
        return {rid: code for rid, code in self.exit_codes.items() if code is not None}

    def restart(self, rid: str) -> None:
        self.started.append(rid)
        self.exit_codes[rid] = None

    def die(self, rid: str, code: int = -9) -> None:
        self.exit_codes[rid] = code


def test_restarts_with_exponential_backoff_reset_after_a_stable_run():
    launcher, exits = FakeLauncher("a", "b"), []
    sup = Supervisor(launcher, on_exit=lambda rid, code: exits.append((rid, code)),
                     backoff_s=1, max_backoff_s=4, stable_s=60)
    launcher.die("a")
    sup.poll(0.0)
    assert exits == [("a", -9)] and launcher.started == []      # reported once, restart pending
    sup.poll(0.5)
    assert exits == [("a", -9)] and launcher.started == []
    sup.poll(1.0)
    assert launcher.started == ["a"]
    # Dies again right away: 2 s, then 4, then capped at 4.
    for t0, delay in [(2.0, 2), (10.0, 4), (20.0, 4)]:
        launcher.die("a")
        sup.poll(t0)
        sup.poll(t0 + delay - 0.1)
        assert launcher.started.count("a") == len([d for d in exits if d[0] == "a"]) - 1
        sup.poll(t0 + delay)
        assert launcher.started.count("a") == len([d for d in exits if d[0] == "a"])
    # Up for longer than stable_s: back to the first delay.
    launcher.die("a")
    sup.poll(100.0)
    sup.poll(101.0)
    assert launcher.started.count("a") == 5 and sup.restarts == {"a": 5}
    assert "b" not in launcher.started


def test_a_replica_that_was_never_ready_is_not_restarted():
    launcher, exits = FakeLauncher("a"), []
    sup = Supervisor(launcher, on_exit=lambda rid, code: exits.append(rid), may_restart=lambda rid: False)
    launcher.die("a", 1)
    for t in range(5):
        sup.poll(float(t * 10))
    assert exits == ["a"] and launcher.started == [] and sup.given_up == {"a"}
