"""`vpnctl rotate`'s local side: each rotation phase renders (and passes render --check) with
`nextkey` where vpnctl/rotation.py's table puts it, deploy plans a reload (never a restart) for
a step and removes a retired next-key file; `keys` warns about old keys; bad options are
refused by name. The remote side is tests/e2e/test_rotate.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner, Result

from vpnctl.cli import app
from vpnctl.deploy import RemoteState, apply_script, desired_files, load_manifest, plan_host
from vpnctl.keystore import Keystore

INVENTORY = """\
defaults:
  systemd: false
hosts:
  - {name: alpha, address: 198.18.1.1}
  - {name: beta, address: 198.18.1.2}
  - {name: gamma, address: 198.18.1.3}
links:
  - {name: web, server: alpha, client: beta, port: 4001}
hubs:
  - {name: hq, server: alpha, port: 4000, network: 198.19.50.0/24, clients: [gamma]}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for var in ("VPNCTL_INVENTORY", "VPNCTL_KEYSTORE", "VPNCTL_BUILD"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    assert run("keygen").exit_code == 0
    return tmp_path


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def rendered(project: Path) -> None:
    result = run("render")
    assert result.exit_code == 0, result.output
    check = run("render", "--check")
    assert check.exit_code == 0, check.output


def conf(project: Path, host: str, name: str) -> str:
    return (project / "build" / host / "etc" / "vpnd" / name).read_text()


def keys_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("keyfile", "nextkey"))]


def remote_of(project: Path, host: str, manifest: dict) -> RemoteState:
    """A host on which `manifest` is deployed exactly and its daemons run."""
    files = desired_files(project / "build", manifest, Keystore(project / "keystore"),
                          use_systemd=False)  # fmt: skip
    return RemoteState(stamp="s", systemd_running=False, python="/usr/bin/python3",
                       files={f.path: (f.sha256, f.mode) for f in files},
                       running=dict.fromkeys(manifest["links"], True), deployed=manifest,
                       uid=0)  # fmt: skip


def plan(project: Path, host: str, remote: RemoteState):
    manifest = load_manifest(project / "build", host)
    files = desired_files(project / "build", manifest, Keystore(project / "keystore"),
                          use_systemd=False)  # fmt: skip
    return manifest, plan_host(host, manifest, files, remote, runtime_stamp="s",
                               use_systemd=False)  # fmt: skip


def test_each_phase_renders_nextkey_where_the_table_says_and_deploy_only_reloads(
    project: Path,
) -> None:
    store = Keystore(project / "keystore")
    rendered(project)
    old = store.info("web").fingerprint  # type: ignore[union-attr]
    deployed = {h: load_manifest(project / "build", h) for h in ("alpha", "beta")}
    remote = {h: remote_of(project, h, m) for h, m in deployed.items()}
    new = store.generate("web", staged=True).fingerprint
    rendered(project)  # a staged key alone (keygen --rotate) changes nothing
    assert "nextkey" not in conf(project, "alpha", "web.conf")

    store.set_rotation_phase("web", "accept")
    rendered(project)
    assert keys_lines(conf(project, "alpha", "web.conf")) == [
        "keyfile /etc/vpnd/web.key", "nextkey /etc/vpnd/web.next.key"]  # fmt: skip
    assert keys_lines(conf(project, "beta", "web.conf")) == keys_lines(
        conf(project, "alpha", "web.conf")
    )
    entry = load_manifest(project / "build", "beta")["links"]["web"]
    assert (entry["key_fingerprint"], entry["next_key_fingerprint"]) == (old, new)
    assert entry["session_key_fingerprint"] == old
    for host in ("alpha", "beta"):
        manifest, result = plan(project, host, remote[host])
        assert result.changed == {} and result.restarts == [], result
        assert sorted(result.reload) == ["web"]
        assert sorted(f.kind for f in result.files) == ["config", "nextkey"]
        script = apply_script(result, manifest, deployed[host])
        assert "kill -HUP" in script and "--daemon" not in script
        deployed[host], remote[host] = manifest, remote_of(project, host, manifest)

    store.set_rotation_phase("web", "switch")
    rendered(project)  # render --check: the ends' primary keys differ, their session key not
    entry = load_manifest(project / "build", "beta")["links"]["web"]
    assert (entry["key_fingerprint"], entry["next_key_fingerprint"]) == (new, old)
    assert entry["session_key_fingerprint"] == new
    server = load_manifest(project / "build", "alpha")["links"]["web"]
    assert (server["key_fingerprint"], server["session_key_fingerprint"]) == (old, new)
    _, result = plan(project, "alpha", remote["alpha"])
    assert result.noop  # the server already accepts both keys
    manifest, result = plan(project, "beta", remote["beta"])
    assert sorted(result.reload) == ["web"] and result.restarts == []
    assert sorted(f.kind for f in result.files) == ["key", "nextkey"]  # the two keys swap
    deployed["beta"], remote["beta"] = manifest, remote_of(project, "beta", manifest)

    store.promote("web")
    store.set_rotation_phase("web", "retire")
    rendered(project)
    for host in ("alpha", "beta"):
        assert keys_lines(conf(project, host, "web.conf")) == ["keyfile /etc/vpnd/web.key"]
        manifest, result = plan(project, host, remote[host])
        assert sorted(result.reload) == ["web"] and result.restarts == []
        assert result.prune == {"web": ["/etc/vpnd/web.next.key"]}  # nothing left unused
        assert "rm -f /etc/vpnd/web.next.key" in apply_script(result, manifest, deployed[host])
        assert manifest["links"]["web"]["key_fingerprint"] == new


def test_a_hub_clients_rotation_goes_into_the_hubs_peer_file_and_reloads_the_hub(
    project: Path,
) -> None:
    store = Keystore(project / "keystore")
    rendered(project)
    alpha = load_manifest(project / "build", "alpha")
    remote = remote_of(project, "alpha", alpha)
    store.generate("hq.gamma", staged=True)
    store.set_rotation_phase("hq.gamma", "accept")
    rendered(project)
    peer = (project / "build/alpha/etc/vpnd/hq.peers/gamma.peer").read_text()
    assert "nextkey /etc/vpnd/hq.peers/gamma.next.key\n" in peer
    assert "nextkey /etc/vpnd/hq.next.key\n" in conf(project, "gamma", "hq.conf")
    _, result = plan(project, "alpha", remote)
    assert result.restarts == [] and list(result.reload) == ["hq"]  # reloaded, not restarted
    assert ("peernextkey", "/etc/vpnd/hq.peers/gamma.next.key") in {
        (f.kind, f.path) for f in result.files
    }
    store.set_rotation_phase("hq.gamma", "switch")
    rendered(project)


def test_a_config_change_beside_the_keys_still_restarts(project: Path) -> None:
    store = Keystore(project / "keystore")
    rendered(project)
    beta = load_manifest(project / "build", "beta")
    remote = remote_of(project, "beta", beta)
    store.generate("web", staged=True)
    store.set_rotation_phase("web", "accept")
    inventory = project / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace(
            "client: beta, port: 4001}", "client: beta, port: 4001, mtu: 1300}"
        )
    )
    rendered(project)
    _, result = plan(project, "beta", remote)
    assert result.restarts == ["web"] and result.reload == {}


def test_keys_warns_about_keys_older_than_the_age_and_keeps_exit_0(project: Path) -> None:
    result = run("keys", "--max-age", "1s")
    assert result.exit_code == 0  # the keys are new: nothing to warn about yet
    assert "warning" not in result.output
    for meta in (project / "keystore").glob("*.meta.json"):
        doc = json.loads(meta.read_text())
        doc["created"] = "2020-01-01T00:00:00Z"
        meta.write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["keys", "--max-age", "90d"])
    assert result.exit_code == 0
    assert "OLD" in result.stdout
    assert "warning: key web is " in result.stderr
    assert "older than 90d 0h (--max-age 90d); rotate it: vpnctl rotate web" in result.stderr
    assert "`vpnctl rotate --all --max-age 90d` rotates them all (web hq.gamma)" in result.stderr
    doc = json.loads(CliRunner().invoke(app, ["keys", "--json", "--max-age", "90d"]).stdout)
    assert doc["max_age_seconds"] == 90 * 86400
    assert {row["link"]: row["too_old"] for row in doc["links"]} == {"web": True, "hq.gamma": True}
    assert {row["age_from"] for row in doc["links"]} == {"metadata"}


def test_the_inventory_sets_the_age_and_a_key_without_metadata_shows_its_mtime(
    project: Path,
) -> None:
    inventory = project / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace("defaults:\n", "defaults:\n  key_max_age: 1h\n")
    )
    (project / "keystore" / "web.meta.json").unlink()
    key = project / "keystore" / "web.key"
    import os

    os.utime(key, (1_600_000_000, 1_600_000_000))
    result = CliRunner().invoke(app, ["keys"])
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if line.startswith("web "))
    assert "(mtime) OLD" in line
    assert "(defaults.key_max_age (inventory.yaml:2))" in result.stderr
    assert "hq.gamma" not in result.stderr


def test_a_bad_age_in_the_inventory_or_option_is_refused_by_name(project: Path) -> None:
    inventory = project / "inventory.yaml"
    inventory.write_text(
        inventory.read_text().replace("defaults:\n", "defaults:\n  key_max_age: 90\n")
    )
    result = run("keys")
    assert result.exit_code == 2
    assert "inventory.yaml:2 defaults.key_max_age: '90' is not an age" in result.output
    inventory.write_text(INVENTORY)
    for args in (["keys", "--max-age", "soon"], ["rotate", "--all", "--max-age", "3x"]):
        result = run(*args)
        assert result.exit_code == 2, args
        assert "--max-age: " in result.output and "is not an age" in result.output


def test_rotate_refuses_unknown_links_and_mixed_options_before_touching_anything(
    project: Path,
) -> None:
    before = sorted(p.name for p in (project / "keystore").iterdir())
    for args, message in (
        (["rotate"], "name a link (or <hub>.<client>), or give --all (keys: web, hq.gamma)"),
        (["rotate", "nope"], "no link or hub client nope (keys: web, hq.gamma)"),
        (["rotate", "web", "--all"], "give link names or --all, not both"),
        (["rotate", "--abort", "--all"], "--abort takes link names, not --all or --max-age"),
    ):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, result.output
    result = run("rotate", "--abort", "web")
    assert result.exit_code == 2 and "no rotation under way; nothing to abort" in result.output
    assert sorted(p.name for p in (project / "keystore").iterdir()) == before


def test_rotate_all_with_max_age_skips_young_keys_without_contacting_a_host(
    project: Path,
) -> None:
    result = run("rotate", "--all", "--max-age", "30d")
    assert result.exit_code == 0, result.output
    assert re.search(
        r"web: skipped: its key is \d+s old, not older than --max-age 30d", result.output
    )
    assert "2 skipped" in result.output
    doc = json.loads(CliRunner().invoke(app, ["rotate", "--all", "--max-age", "30d",
                                              "--json"]).stdout)  # fmt: skip
    schema = Path(__file__).resolve().parents[2] / "docs" / "json" / "rotate.schema.json"
    jsonschema.validate(doc, json.loads(schema.read_text()))
    assert doc["ok"] is True
    assert [(e["link"], e["unit"], e["result"]) for e in doc["links"]] == [
        ("web", "web", "skipped"), ("hq.gamma", "hq/gamma", "skipped")]  # fmt: skip


def test_an_encrypted_keys_rotation_ships_both_keys_with_one_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpnctl.commands.deploy import preflight
    from vpnctl.workspace import Workspace

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROT_PASS", "correct horse")
    (tmp_path / "inventory.yaml").write_text(INVENTORY)
    assert run("keygen", "--passphrase-env", "ROT_PASS").exit_code == 0
    store = Keystore(tmp_path / "keystore")
    new = store.generate("web", staged=True, passphrase=b"correct horse")
    store.set_rotation_phase("web", "switch")
    assert run("render").exit_code == 0
    ws = Workspace(tmp_path / "inventory.yaml", tmp_path / "keystore", tmp_path / "build")
    unlocked = preflight(ws, ws.load_inventory(), ["beta"], "ROT_PASS", None)
    manifest = load_manifest(tmp_path / "build", "beta")
    files = {f.kind: f for f in desired_files(tmp_path / "build", manifest, unlocked,
                                              use_systemd=False)}  # fmt: skip
    staged_key = store.load("web", passphrase=b"correct horse", staged=True)
    assert files["key"].data == (staged_key.hex() + "\n").encode()  # the client's primary
    assert files["nextkey"].data == store.key_file_bytes("web", passphrase=b"correct horse")
    assert manifest["links"]["web"]["key_fingerprint"] == new.fingerprint
    # `vpnctl rotate` reads the passphrase once and hands it to each step's pre-flight
    monkeypatch.delenv("ROT_PASS")
    again = preflight(ws, ws.load_inventory(), ["beta"], None, None, passphrase=b"correct horse")
    assert again.load("web", staged=True) == staged_key
