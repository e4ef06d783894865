"""Deploy's confirm phase judged from scripted status reads (no hosts needed): when a link counts
as up, as waiting for its other end, or as failed and to be rolled back."""

from __future__ import annotations

import json
from typing import Any

from vpnctl.deploy import confirm_links
from vpnctl.ssh import RemoteResult, SshError

FP = "ab12:cd34"
NOW = 5000.0


def _manifest(host: str, peer: str) -> dict[str, Any]:
    base = f"/srv/{host}"
    return {
        "host": host,
        "prefix": base,
        "links": {
            "l1": {
                "peer": peer,
                "config": f"{base}/etc/vpnd/l1.conf",
                "keyfile": f"{base}/etc/vpnd/l1.key",
                "pidfile": f"{base}/run/vpnd/l1.pid",
                "statusfile": f"{base}/run/vpnd/l1.status.json",
                "key_fingerprint": FP,
            }
        },
    }


class ScriptedHost:
    """Answers every status read with one fixed state for link l1 (None: daemon gone)."""

    def __init__(self, state: str | None, pid: int = 42, since: float = NOW - 1) -> None:
        self.state = state
        self.pid = pid
        self.since = since

    def run(self, command: str, **_: Any) -> RemoteResult:
        if self.state is None:
            block = "config yes\nalive no\n-\n"
        else:
            record = {"state": self.state, "pid": self.pid, "since": self.since, "updated": NOW,
                      "key_fingerprint": FP, "reason": None}  # fmt: skip
            block = f"config yes\nalive yes\n{json.dumps(record)}\n"
        text = f"{NOW}\n@@vpnctl l1\n{block}keymtime 100\npidfile {self.pid}\n"
        return RemoteResult(0, text.encode(), b"")


def _confirm(a: str | None, b: str | None, restarted: list[str]) -> tuple[str, str]:
    ssh = {"a": ScriptedHost(a), "b": ScriptedHost(b)}
    manifests = {"a": _manifest("a", "b"), "b": _manifest("b", "a")}
    results = confirm_links({"l1": ["a", "b"]}, {"l1": FP}, ssh, manifests,  # type: ignore[arg-type]
                            wait=0.0, jobs=2, restarted={"l1": restarted})  # fmt: skip
    return results["l1"]


def test_a_link_up_at_both_ends_with_the_manifest_key_is_confirmed() -> None:
    assert _confirm("up", "up", ["a", "b"])[0] == "up"


def test_a_link_whose_untouched_other_end_is_not_running_is_waiting() -> None:
    assert _confirm("connecting", None, ["a"])[0] == "waiting"


def test_a_link_broken_at_both_ends_by_this_deploy_fails_and_is_rolled_back() -> None:
    verdict, why = _confirm("connecting", None, ["a", "b"])
    assert verdict == "failed"
    assert "b: not running" in why


def test_an_up_record_older_than_the_restart_is_not_taken_for_the_new_daemon() -> None:
    ssh = {"a": ScriptedHost("up", since=NOW - 100), "b": ScriptedHost("up")}
    manifests = {"a": _manifest("a", "b"), "b": _manifest("b", "a")}
    results = confirm_links({"l1": ["a", "b"]}, {"l1": FP}, ssh, manifests,  # type: ignore[arg-type]
                            wait=0.0, jobs=2, restarted={"l1": ["a"]},
                            not_before={"a": NOW - 10})  # fmt: skip
    assert results["l1"][0] == "failed"
    assert "predates the restart" in results["l1"][1]


def test_a_restarted_end_that_is_not_running_fails_even_if_the_other_end_is_untouched() -> None:
    assert _confirm(None, "up", ["a"])[0] == "failed"


class RecordingHost(ScriptedHost):
    """A host whose apply exits with `apply_rc`; remembers which kind of script it ran."""

    def __init__(self, apply_rc: int) -> None:
        super().__init__("up")
        self.apply_rc = apply_rc
        self.ran: list[str] = []

    def run(self, command: str, **kwargs: Any) -> RemoteResult:
        if "@@vpnctl" in command:
            return super().run(command, **kwargs)
        if "tar -x" in command:
            self.ran.append("apply")
            return RemoteResult(self.apply_rc, b"", b"tar: cannot open" if self.apply_rc else b"")
        if "manifest.json.new" in command:
            self.ran.append("commit")
        else:
            self.ran.append("rollback+finish" if "/pending" in command else "rollback")
        return RemoteResult(0, b"", b"")


def test_a_host_whose_apply_fails_is_rolled_back_and_its_peer_follows() -> None:
    from vpnctl.deploy import (
        DesiredFile,
        HostOutcome,
        RemoteState,
        _apply_confirm_commit,
        _Printer,
        plan_host,
    )

    manifests = {"a": _manifest("a", "b"), "b": _manifest("b", "a")}
    outcomes, states = {}, {}
    for name in ("a", "b"):
        conf = DesiredFile(f"/srv/{name}/etc/vpnd/l1.conf", b"new\n", 0o644, "l1", "config")
        states[name] = RemoteState("s1", False, "python3", {conf.path: ("old", 0o644)},
                                   {"l1": True}, None)  # fmt: skip
        plan = plan_host(name, manifests[name], [conf], states[name], runtime_stamp="s1",
                         use_systemd=False)  # fmt: skip
        outcomes[name] = HostOutcome(name, plan)
    ssh = {"a": RecordingHost(apply_rc=3), "b": RecordingHost(apply_rc=0)}
    lines: list[str] = []
    applied: set[str] = set()
    _apply_confirm_commit(["a", "b"], outcomes, manifests, states, ssh,  # type: ignore[arg-type]
                          runtime=None, tarball=b"", printer=_Printer(lines.append, 2),  # type: ignore[arg-type]
                          applied=applied, wait=0.0, jobs=2, echo=lines.append)  # fmt: skip
    assert ssh["a"].ran == ["apply", "rollback+finish"]
    assert ssh["b"].ran == ["apply", "rollback", "commit"]
    assert "apply exited 3" in (outcomes["a"].error or "")
    assert "previous files and daemons restored" in outcomes["a"].rolled_back["l1"]
    assert "the apply on a failed" in outcomes["b"].rolled_back["l1"]
    assert applied == set(), "nothing is left to roll back on Ctrl-C"


def test_a_runtime_install_that_fails_is_not_switched_back_to_an_older_runtime() -> None:
    from vpnctl.deploy import (
        DesiredFile,
        HostOutcome,
        RemoteState,
        _apply_confirm_commit,
        _Printer,
        plan_host,
    )

    class InstallFails(RecordingHost):
        commands: list[str]

        def run(self, command: str, **kwargs: Any) -> RemoteResult:
            self.commands = [*getattr(self, "commands", []), command]
            if "python3 -m venv" in command:  # what SshHost.run(check=True) does on exit 1
                raise SshError("a", "remote command failed (1): no space left on device")
            return super().run(command, **kwargs)

    manifests = {"a": _manifest("a", "b")}
    conf = DesiredFile("/srv/a/etc/vpnd/l1.conf", b"new\n", 0o644, "l1", "config")
    states = {"a": RemoteState("old", False, "python3", {conf.path: ("x", 0o644)}, {}, None)}
    plan = plan_host("a", manifests["a"], [conf], states["a"], runtime_stamp="new",
                     use_systemd=False)  # fmt: skip
    outcomes = {"a": HostOutcome("a", plan)}
    host = InstallFails(apply_rc=0)
    runtime = type("R", (), {"stamp": "new"})()
    _apply_confirm_commit(["a"], outcomes, manifests, states, {"a": host},  # type: ignore[dict-item]
                          runtime=runtime, tarball=b"", printer=_Printer(lambda _: None, 1),  # type: ignore[arg-type]
                          applied=set(), wait=0.0, jobs=1, echo=lambda _: None)  # fmt: skip
    assert host.ran == ["rollback+finish"]
    assert "opt/vpnd/previous" not in host.commands[-1]
    assert "remote command failed" in (outcomes["a"].error or "")


class NextKeyHost(ScriptedHost):
    """Up, and reporting `next_key` as the next key it also accepts (None: none)."""

    def __init__(self, next_key: str | None) -> None:
        super().__init__("up")
        self.next_key = next_key

    def run(self, command: str, **_: Any) -> RemoteResult:
        record = {"state": "up", "pid": self.pid, "since": self.since, "updated": NOW,
                  "key_fingerprint": FP, "next_key_fingerprint": self.next_key,
                  "reason": None}  # fmt: skip
        text = (f"{NOW}\n@@vpnctl l1\nconfig yes\nalive yes\n{json.dumps(record)}\n"
                f"keymtime 100\npidfile {self.pid}\n")  # fmt: skip
        return RemoteResult(0, text.encode(), b"")


def test_a_reloaded_end_that_did_not_load_its_next_key_fails_though_its_session_is_up() -> None:
    # Given a rotation step that gave host a a next key, reloaded there by SIGHUP
    manifests = {"a": _manifest("a", "b"), "b": _manifest("b", "a")}

    def confirm(reported: str | None) -> tuple[str, str]:
        ssh = {"a": NextKeyHost(reported), "b": NextKeyHost(None)}
        nxt = {("a", "l1"): "ef56:7890", ("b", "l1"): None}
        return confirm_links({"l1": ["a", "b"]}, {"l1": FP}, ssh, manifests,  # type: ignore[arg-type]
                             wait=0.0, jobs=2, restarted={"l1": ["a"]},
                             reloaded={("a", "l1")}, next_keys=nxt)["l1"]  # fmt: skip

    # When the daemon could not apply the SIGHUP (its session stays up on the old key), the
    # link is not confirmed, and the message says which end and what it reports
    verdict, why = confirm(None)
    assert verdict == "failed"
    assert "a does not accept the next key ef56:7890 (it reports none; see its log)" in why
    # And once it reports the next key, it is
    assert confirm("ef56:7890")[0] == "up"
