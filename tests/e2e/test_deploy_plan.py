"""Deploy's pure parts, no hosts needed: planning, probe parsing, redacted diffs, the runtime wheel,
the status parser. (They live beside the deploy e2e tests they back.)"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tests.helpers.workspace import workspace
from vpnctl.deploy import (
    DeployError,
    DesiredFile,
    RemoteState,
    _committed_manifest,
    _runtime_wheel,
    apply_script,
    commit_script,
    desired_files,
    parse_probe,
    parse_status_output,
    plan_host,
    redacted_diff,
    status_script,
)
from vpnctl.fleetstatus import _judge, parse_host_output
from vpnctl.keystore import Keystore

KEY = b"ab" * 32 + b"\n"
PREFIX = "/srv/h1"


def _manifest(*links: str) -> dict:
    return {
        "host": "h1",
        "prefix": PREFIX,
        "systemd": False,
        "links": {
            link: {
                "role": "server",
                "peer": "h2",
                "config": f"{PREFIX}/etc/vpnd/{link}.conf",
                "keyfile": f"{PREFIX}/etc/vpnd/{link}.key",
                "pidfile": f"{PREFIX}/run/vpnd/{link}.pid",
                "statusfile": f"{PREFIX}/run/vpnd/{link}.status.json",
                "key_fingerprint": "ab12:cd34:ef56:7890",
                "files": {},
            }
            for link in links
        },
    }


def _desired(link: str, conf: bytes = b"mode server\n") -> list[DesiredFile]:
    return [
        DesiredFile(f"{PREFIX}/etc/vpnd/{link}.conf", conf, 0o644, link, "config"),
        DesiredFile(f"{PREFIX}/etc/vpnd/{link}.key", KEY, 0o600, link, "key"),
    ]


def _remote(files: list[DesiredFile], *, stamp: str = "s1", running: tuple[str, ...] = (),
            deployed: dict | None = None) -> RemoteState:  # fmt: skip
    return RemoteState(
        stamp=stamp,
        systemd_running=False,
        python="3.11",
        files={f.path: (f.sha256, f.mode) for f in files},
        running=dict.fromkeys(running, True),
        deployed=deployed,
    )


def test_matching_files_and_running_daemons_plan_nothing() -> None:
    desired = _desired("l1") + _desired("l2")
    plan = plan_host("h1", _manifest("l1", "l2"), desired,
                     _remote(desired, running=("l1", "l2")), runtime_stamp="s1",
                     use_systemd=False)  # fmt: skip
    assert plan.noop
    assert plan.unchanged == ["l1", "l2"]
    assert plan.files == []


def test_a_changed_config_restarts_only_its_link_and_writes_only_that_file() -> None:
    deployed = _desired("l1") + _desired("l2")
    desired = _desired("l1", b"mode server\nroute1 198.18.60.0 255.255.255.0 198.19.0.2\n")
    desired += _desired("l2")
    plan = plan_host("h1", _manifest("l1", "l2"), desired,
                     _remote(deployed, running=("l1", "l2")), runtime_stamp="s1",
                     use_systemd=False)  # fmt: skip
    assert plan.changed == {"l1": ["config changed"]}
    assert plan.restarts == ["l1"]
    assert [f.kind for f in plan.files] == ["config"]


def test_a_new_runtime_restarts_every_link_but_rewrites_no_file() -> None:
    desired = _desired("l1") + _desired("l2")
    plan = plan_host("h1", _manifest("l1", "l2"), desired,
                     _remote(desired, stamp="old", running=("l1", "l2")), runtime_stamp="new",
                     use_systemd=False)  # fmt: skip
    assert plan.runtime
    assert plan.restarts == ["l1", "l2"]
    assert plan.files == []


def test_a_stopped_daemon_with_current_files_is_started_not_rewritten() -> None:
    desired = _desired("l1")
    plan = plan_host("h1", _manifest("l1"), desired, _remote(desired), runtime_stamp="s1",
                     use_systemd=False)  # fmt: skip
    assert plan.start == ["l1"]
    assert plan.changed == {}
    assert plan.restarts == ["l1"]


def test_a_key_with_loose_mode_on_the_host_is_reinstalled() -> None:
    desired = _desired("l1")
    remote = _remote(desired, running=("l1",))
    loose = dict(remote.files)
    loose[desired[1].path] = (desired[1].sha256, 0o644)
    remote = RemoteState("s1", False, "3.11", loose, {"l1": True}, None)
    plan = plan_host("h1", _manifest("l1"), desired, remote, runtime_stamp="s1",
                     use_systemd=False)  # fmt: skip
    assert plan.changed == {"l1": ["key mode 644"]}


def test_a_key_not_owned_by_the_daemons_user_is_reinstalled_and_handed_over() -> None:
    # Given a host whose daemons run as vpnd, and a key left root's by an older deploy
    desired = _desired("l1")
    manifest = {**_manifest("l1"), "run_as": ["vpnd", "vpnd"]}
    remote = _remote(desired, running=("l1",))
    files = {f.path: (f.sha256, f.mode, "vpnd:vpnd") for f in desired}
    files[desired[1].path] = (desired[1].sha256, desired[1].mode, "root:root")
    remote = RemoteState("s1", False, "3.11", files, {"l1": True}, None)
    # When planned, the key is written again (a SIGHUP as vpnd could not read it) and chowned
    plan = plan_host("h1", manifest, desired, remote, runtime_stamp="s1", use_systemd=False)
    assert plan.changed == {"l1": ["key owner root:root"]}
    assert [f.path for f in plan.files] == [desired[1].path]
    assert f"chown vpnd:vpnd {desired[1].path}" in apply_script(plan, manifest, {})
    # And a config's owner is nobody's business, nor is anything on a root-run host
    files[desired[1].path] = (desired[1].sha256, desired[1].mode, "vpnd:vpnd")
    files[desired[0].path] = (desired[0].sha256, desired[0].mode, "root:root")
    remote = RemoteState("s1", False, "3.11", files, {"l1": True}, None)
    assert plan_host("h1", manifest, desired, remote, runtime_stamp="s1",
                     use_systemd=False).changed == {}  # fmt: skip
    files[desired[1].path] = (desired[1].sha256, desired[1].mode, "root:root")
    assert plan_host("h1", _manifest("l1"), desired, remote, runtime_stamp="s1",
                     use_systemd=False).changed == {}  # fmt: skip


def test_a_link_dropped_from_the_render_is_stopped_and_removed() -> None:
    desired = _desired("l1")
    plan = plan_host("h1", _manifest("l1"), desired,
                     _remote(desired, running=("l1",), deployed=_manifest("l1", "old")),
                     runtime_stamp="s1", use_systemd=False)  # fmt: skip
    assert plan.removed == ["old"]
    script = apply_script(plan, _manifest("l1"), _manifest("l1", "old"))
    assert f"rm -f {PREFIX}/etc/vpnd/old.key" in script


def test_the_dry_run_diff_redacts_key_contents() -> None:
    deployed = _desired("l1", b"mode server\nport 1\n")
    desired = _desired("l1", b"mode server\nport 2\n")
    desired[1] = DesiredFile(desired[1].path, b"cd" * 32 + b"\n", 0o600, "l1", "key")
    plan = plan_host("h1", _manifest("l1"), desired, _remote(deployed, running=("l1",)),
                     runtime_stamp="s1", use_systemd=False)  # fmt: skip
    diff = redacted_diff("h1", plan, {deployed[0].path: deployed[0].data}, [deployed[1].path])
    assert "-port 1\n+port 2\n" in diff
    assert "@@ key file, contents redacted @@" in diff
    assert "cd" * 32 not in diff
    assert "ab" * 32 not in diff


def test_no_script_ever_carries_key_material() -> None:
    desired = _desired("l1")
    plan = plan_host("h1", _manifest("l1"), desired, _remote([]), runtime_stamp="s1",
                     use_systemd=False)  # fmt: skip
    assert KEY.strip().decode() not in apply_script(plan, _manifest("l1"), {})


def test_probe_output_gives_hashes_modes_running_links_and_the_last_manifest() -> None:
    paths = ["/a.conf", "/a.key"]
    text = (
        "stamp 0123456789abcdef\nsystemd no\npython 3.11\n"
        f"file 0 {'e' * 64} 644 root:root\nfile 1 - -\n"
        "deployed eyJsaW5rcyI6IHt9fQ==\nrunning l1 yes\nrunning l2 no\n"
    )
    state = parse_probe(text, paths)
    assert state.stamp == "0123456789abcdef"
    assert state.files == {"/a.conf": ("e" * 64, 0o644, "root:root"), "/a.key": None}
    assert state.running == {"l1": True, "l2": False}
    assert state.deployed == {"links": {}}
    assert not state.systemd_running


def test_runtime_wheel_is_byte_identical_across_builds(tmp_path: Path) -> None:
    first = _runtime_wheel(tmp_path).read_bytes()
    second = _runtime_wheel(tmp_path).read_bytes()
    assert first == second
    with zipfile.ZipFile(_runtime_wheel(tmp_path)) as zf:
        names = zf.namelist()
    assert "vpnd_runtime/cli.py" in names
    assert not [n for n in names if n.startswith("vpnctl/")], "the operator tool is not shipped"


def test_a_build_edited_after_render_is_refused_naming_the_file(tmp_path: Path) -> None:
    build = tmp_path / "build"
    (build / "h1" / "etc" / "vpnd").mkdir(parents=True)
    conf = build / "h1" / "etc" / "vpnd" / "l1.conf"
    conf.write_text("mode server\n")
    manifest = _manifest("l1")
    manifest["links"]["l1"]["files"] = {"etc/vpnd/l1.conf": "0" * 64}
    with pytest.raises(DeployError, match=r"l1\.conf: does not match its sha256"):
        desired_files(build, manifest, Keystore(tmp_path / "ks"), use_systemd=False)


def test_status_output_of_a_host_becomes_one_end_per_link() -> None:
    record = {"state": "up", "since": 1000.0, "peer": "198.18.1.1:379", "last_rtt": 0.002,
              "bytes_in": 10, "bytes_out": 20, "key_fingerprint": "ab12", "pid": 7,
              "reason": None, "updated": 1100.0}  # fmt: skip
    text = (
        "1100.5\n"
        f"@@vpnctl l1\nconfig yes\nalive yes\n{json.dumps(record)}\nkeymtime 100\npidfile 7\n"
        "@@vpnctl l2\nconfig no\nalive no\n-\nkeymtime -\npidfile -\n"
        f"@@vpnctl l3\nconfig yes\nalive no\n{json.dumps(record)}\nkeymtime 100\npidfile -\n"
    )
    ends = parse_host_output("h1", _manifest("l1", "l2", "l3"), text)
    assert ends[0].state == "up"
    assert ends[0].uptime == pytest.approx(100.5)
    assert ends[0].key_age == pytest.approx(1000.5)
    assert ends[1].state == "not deployed"
    assert ends[2].state == "not running", "a record whose daemon is gone is not trusted"
    assert "pid 7" in (ends[2].reason or "")
    verdict = _judge("l2", [ends[1]])
    assert not verdict.up
    assert "not deployed" in verdict.why


def test_the_status_script_reads_every_link_in_one_shell_without_python() -> None:
    script = status_script(_manifest("l1", "l2"), ["l1", "l2"])
    assert "python" not in script
    assert script.count("@@vpnctl") == 2
    assert f"{PREFIX}/run/vpnd/l2.status.json" in script


def _cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from vpnctl.cli import app

    result = CliRunner().invoke(app, [*workspace(tmp_path), *args])
    return result.exit_code, result.output


def test_deploy_to_an_unknown_host_names_the_inventory_and_the_host(tmp_path: Path) -> None:
    code, out = _cli(tmp_path, "deploy", "gamma")
    assert code == 2
    assert "inventory.yaml: no host named gamma" in out


def test_deploy_before_render_says_to_render_first(tmp_path: Path) -> None:
    code, out = _cli(tmp_path, "deploy", "--all")
    assert code == 2
    assert "manifest.json: not rendered; run `vpnctl render` first" in out


def test_deploy_with_neither_hosts_nor_all_is_refused(tmp_path: Path) -> None:
    code, out = _cli(tmp_path, "deploy")
    assert code == 2
    assert "name at least one host, or give --all" in out


def test_under_systemd_units_are_installed_and_links_restarted_with_systemctl() -> None:
    desired = [
        *_desired("l1"),
        DesiredFile("/etc/systemd/system/vpnd-l1.service", b"[Unit]\n", 0o644, "l1", "unit"),
    ]
    plan = plan_host("h1", _manifest("l1"), desired, _remote([]), runtime_stamp="s1",
                     use_systemd=True)  # fmt: skip
    assert plan.changed == {"l1": ["new config", "new key", "new unit"]}
    script = apply_script(plan, _manifest("l1"), {})
    assert "systemctl daemon-reload && systemctl enable --quiet vpnd-l1" in script
    assert "systemctl restart vpnd-l1" in script
    assert "--daemon" not in script


def test_a_pending_marker_from_an_interrupted_deploy_restarts_and_confirms_every_link() -> None:
    files = _desired("l1") + _desired("l2")
    remote = RemoteState(**{**_remote(files, running=("l1", "l2")).__dict__, "pending": True})
    plan = plan_host("h1", _manifest("l1", "l2"), files, remote, runtime_stamp="s1",
                     use_systemd=False)  # fmt: skip
    assert plan.changed == {
        "l1": ["interrupted deploy not committed"],
        "l2": ["interrupted deploy not committed"],
    }
    assert plan.files == [], "nothing is rewritten; the links are restarted and confirmed"
    assert plan.paths["l1"] == [f.path for f in _desired("l1")]


def test_probe_reports_the_users_uid_and_a_pending_deploy_and_ignores_noise() -> None:
    paths = ["/a"]
    text = "Welcome!\nuid 1000\npending yes\nfile 0 abc 644\nfile 7 x y\nfile zz\nrunning odd\n"
    remote = parse_probe(text, paths)
    # (an older probe's line without the owner still parses)
    assert (remote.uid, remote.pending, remote.files["/a"]) == (1000, True, ("abc", 0o644, ""))


def test_apply_keeps_the_backup_of_an_uncommitted_deploy_and_holds_the_host_lock() -> None:
    files = _desired("l1", b"mode server\nnew\n")
    plan = plan_host("h1", _manifest("l1"), files, _remote(_desired("l1")), runtime_stamp="s1",
                     use_systemd=False)  # fmt: skip
    script = apply_script(plan, _manifest("l1"), {})
    state = f"{PREFIX}/var/lib/vpnctl"
    assert f"[ -e {state}/pending ] || rm -rf {state}/prev" in script
    assert f": > {state}/pending" in script
    assert "flock -w" in script
    assert script.index("flock -w") < script.index("tar -x")
    assert "--daemon </dev/null 9>&-" in script, "a daemon must not inherit the lock"
    commit = commit_script(_manifest("l1"))
    assert "flock -w" in commit
    assert commit.index("manifest.json") < commit.index("/pending")


def test_a_rolled_back_link_is_recorded_at_its_previous_version_on_commit() -> None:
    new = _manifest("l1", "l2")
    old = _manifest("l1")
    old["links"]["l1"]["key_fingerprint"] = "old"
    record = _committed_manifest(new, old, ["l1", "l2"])
    assert record["links"] == {"l1": old["links"]["l1"]}
    assert _committed_manifest(new, None, [])["links"] == new["links"]


def _one_record(record: dict, pidfile: str, now: float = 1100.0) -> dict:
    text = f"{now}\n@@vpnctl l1\nconfig yes\nalive yes\n{json.dumps(record)}\nkeymtime -\n"
    return parse_status_output(text + f"pidfile {pidfile}\n")["l1"].record or {}


def test_a_status_record_written_by_another_pid_than_the_pidfiles_is_not_trusted() -> None:
    got = _one_record({"state": "up", "pid": 7, "updated": 1100.0}, pidfile="8")
    assert got["state"] == "not running"
    assert "from pid 7, the pidfile names 8" in got["reason"]


def test_a_status_record_not_rewritten_for_more_than_five_seconds_is_stale() -> None:
    got = _one_record({"state": "up", "pid": 7, "updated": 1094.0}, pidfile="7")
    assert got["state"] == "stale"
    assert "not rewritten for 6s" in got["reason"]
    assert _one_record({"state": "up", "pid": 7, "updated": 1096.0}, pidfile="7")["state"] == "up"


def test_a_non_root_ssh_user_is_refused_by_host_name_not_with_a_traceback() -> None:
    from vpnctl.deploy import check_remote

    remote = parse_probe("uid 1000\npython /usr/bin/python3\nstamp -\n", [])
    with pytest.raises(DeployError, match=r"^h1: ssh user 'ops' is not root \(uid 1000\)"):
        check_remote("h1", "ops", remote)
    check_remote("h1", "root", parse_probe("uid 0\npython /usr/bin/python3\n", []))


def _write_manifest(tmp_path: Path, manifest: dict) -> None:
    (tmp_path / "h1").mkdir(exist_ok=True)
    (tmp_path / "h1" / "manifest.json").write_text(json.dumps(manifest))


def test_a_manifest_with_a_link_name_or_path_unsafe_for_the_shell_is_refused(
    tmp_path: Path,
) -> None:
    from vpnctl.deploy import load_manifest

    _write_manifest(tmp_path, _manifest("l1"))
    assert load_manifest(tmp_path, "h1")["links"]["l1"]["peer"] == "h2"
    bad_link = _manifest("l1")
    bad_link["links"]["x; rm -rf /"] = bad_link["links"].pop("l1")
    _write_manifest(tmp_path, bad_link)
    with pytest.raises(DeployError, match=r"manifest\.json: link name 'x; rm -rf /'"):
        load_manifest(tmp_path, "h1")
    bad_path = _manifest("l1")
    bad_path["links"]["l1"]["pidfile"] = "/run/$(reboot).pid"
    _write_manifest(tmp_path, bad_path)
    with pytest.raises(DeployError, match=r"links\.l1\.pidfile '/run/\$\(reboot\)\.pid'"):
        load_manifest(tmp_path, "h1")
    bad_prefix = {**_manifest("l1"), "prefix": "/srv/%h"}
    _write_manifest(tmp_path, bad_prefix)
    with pytest.raises(DeployError, match="prefix '/srv/%h' is not a plain absolute path"):
        load_manifest(tmp_path, "h1")


def test_a_dry_run_whose_tar_of_the_deployed_files_fails_says_so_by_host() -> None:
    from vpnctl.deploy import HostOutcome, _dry_run_diff
    from vpnctl.ssh import RemoteResult

    class TarFails:
        def run(self, command: str, **_: object) -> RemoteResult:
            return RemoteResult(2, b"", b"tar: etc/vpnd/l1.conf: Cannot open: Permission denied")

    new = _desired("l1", b"mode server\nnew\n")
    remote = _remote(_desired("l1"))
    plan = plan_host("h1", _manifest("l1"), new, remote, runtime_stamp="s1", use_systemd=False)
    with pytest.raises(DeployError, match=r"^h1: cannot read the deployed files .*Permission"):
        _dry_run_diff({"h1": HostOutcome("h1", plan)}, {"h1": remote}, {"h1": TarFails()}, "s1")  # type: ignore[dict-item]


FLEET = """version: 1
hosts:
  - name: alpha
    address: 198.18.1.1
  - name: beta
    address: 198.18.1.2
  - name: gamma
    address: 198.18.1.3
links:
  - name: ab
    server: alpha
    client: beta
  - name: ga
    server: gamma
    client: alpha
"""


def test_each_target_gets_its_own_runtime_and_a_target_without_wheels_fails_only_its_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alpha runs the operator's Python; gamma Python 3.13 on the same machine; beta an aarch64
    with a glibc older than any manylinux wheel: beta fails at planning naming host and
    target, before anything is applied, and the others plan a runtime stamped for their own
    target."""
    from typer.testing import CliRunner

    from vpnctl import deploy as deploymod
    from vpnctl.cli import app
    from vpnctl.inventory import load_inventory
    from vpnctl.ssh import RemoteResult

    here = deploymod.local_target()
    libc = f" glibc {here.glibc[0]}.{here.glibc[1]}" if here.glibc else ""
    targets = {
        "alpha": f"cpython {here.python[0]}.{here.python[1]} {here.machine}{libc}",
        "beta": "cpython 3.12 aarch64 glibc 2.12",
        "gamma": f"cpython 3.13 {here.machine}{libc}",
    }
    ran: list[tuple[str, str]] = []

    class ProbedHost:
        def __init__(self, name: str, settings: object, **_: object) -> None:
            self.name = name

        def run(self, command: str, **_: object) -> RemoteResult:
            ran.append((self.name, "probe" if 'echo "uid $(id -u)"' in command else command))
            out = "stamp -\nsystemd no\npython /usr/bin/python3\nuid 0\n"
            out += f"target {targets[self.name]}\n"
            return RemoteResult(0, out.encode(), b"")

    built: list[deploymod.Target] = []
    real_build = deploymod.build_runtime

    def build(cache: Path, echo: object = None, deps_cache: object = None, target=None):
        built.append(target)
        if target.key == "cp312-aarch64-glibc2.12":
            return real_build(cache, None, tmp_path / "wheels", target=target)  # fails: no tags
        wheel = tmp_path / f"{target.key}.whl"
        wheel.write_bytes(target.key.encode())
        stamp = deploymod.runtime_stamp([wheel], target)
        return deploymod.Runtime(stamp=stamp, wheels=(wheel,), pip=wheel)

    (tmp_path / "inventory.yaml").write_text(FLEET)
    Keystore(tmp_path / "keystore").create()
    base = ["-i", str(tmp_path / "inventory.yaml"), "--keystore", str(tmp_path / "keystore"),
            "--build", str(tmp_path / "build")]  # fmt: skip
    for step in ("keygen", "render"):
        result = CliRunner().invoke(app, [*base, step])
        assert result.exit_code == 0, result.output
    monkeypatch.setattr("vpnctl.deploy.run.SshHost", ProbedHost)
    monkeypatch.setattr("vpnctl.deploy.runtime.build_runtime", build)
    lines: list[str] = []
    report = deploymod.deploy(load_inventory(tmp_path / "inventory.yaml"),
                              ["alpha", "beta", "gamma"], tmp_path / "build",
                              Keystore(tmp_path / "keystore"), dry_run=True, jobs=1,
                              echo=lines.append)  # fmt: skip
    assert sorted(t.key for t in built) == sorted(
        {deploymod.parse_target(t).key for t in targets.values()}  # type: ignore[union-attr]
    ), "one build per distinct target"
    beta = report.outcomes["beta"]
    assert beta.plan is None
    assert (beta.error or "").startswith("beta: no runtime for its target cp312-aarch64-glibc2.12:")
    assert "glibc 2.12 is older than any manylinux wheel" in (beta.error or "")
    assert [what for host, what in ran if host == "beta"] == ["probe"], "nothing applied on beta"
    alpha, gamma = report.outcomes["alpha"].plan, report.outcomes["gamma"].plan
    assert alpha is not None and gamma is not None and alpha.runtime and gamma.runtime
    assert f"target {here.key})" in report.diff and "target cp313-" in report.diff
    stamps = report.runtime_stamp.split(", ")
    assert len(stamps) == 2, "alpha and gamma have different targets, so different stamps"
