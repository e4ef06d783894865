"""``vpnctl rotate LINK… | --all [--max-age 90d]``: replace link keys with no downtime.

Each key goes through the three steps of :mod:`vpnctl.rotation` (accept, switch, retire) with
the machinery the operator already uses: the keystore (``keygen --rotate``/``--promote``),
``render`` and ``deploy`` (which reloads, never restarts, a link whose keys alone changed).
After each deploy the daemons' status records are read over ssh (``vpnctl status``'s way)
until both ends show the step took effect, within ``--wait`` seconds; only then does the next
step start. On a failure the command stops, names the step and the host, and says how to
continue (run it again: the keystore records the phase) or go back (``--abort``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from vpnctl.commands.deploy import preflight
from vpnctl.commands.keygen import read_passphrase
from vpnctl.commands.render import rendered
from vpnctl.deploy import DEFAULT_WAIT, DeployReport, deploy
from vpnctl.fleetstatus import EndStatus, collect
from vpnctl.hostdata import clean_text
from vpnctl.inventory import Inventory, UserError
from vpnctl.keystore import Keystore, format_age
from vpnctl.rendering import write_build
from vpnctl.rotation import (
    ACCEPT,
    PHASES,
    RETIRE,
    STEPS,
    keys_due,
    parse_age,
    remaining_steps,
    step_verdict,
    steps_back,
)
from vpnctl.workspace import EXIT_FAILED, PassphraseEnv, PassphraseFile, Workspace, workspace

__all__ = ["RotateFailed", "key_ends", "main"]

POLL = 0.5  # seconds between two status reads while a step is confirmed


class RotateFailed(Exception):
    """A step of a rotation did not take effect; the message says where and what next."""

    def __init__(self, step: str | None, host: str | None, why: str) -> None:
        super().__init__(why)
        self.step, self.host, self.why = step, host, why


@dataclass
class _Result:
    """One key's rotation, as reported (human lines and the --json document)."""

    key: str
    unit: str
    hosts: list[str]
    old: str | None = None
    new: str | None = None
    result: str = "not started"  # rotated | aborted | failed | skipped | not started
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "link": self.key,
            "unit": self.unit,
            "hosts": self.hosts,
            "old_fingerprint": self.old,
            "new_fingerprint": self.new,
            "result": self.result,
            "steps": self.steps,
            "error": self.error,
        }


def key_ends(inventory: Inventory, key: str) -> tuple[str, list[str]]:
    """The status unit of keystore key ``key`` and its two hosts, answering end first: a
    link's (server, client), a hub client's (``<hub>/<client>``, [hub host, client host])."""
    for link in inventory.links:
        if link.name == key:
            return link.name, [link.server.host, link.client.host]
    for hub in inventory.hubs:
        for client in hub.clients:
            if f"{hub.name}.{client.name}" == key:
                return f"{hub.name}/{client.name}", [hub.server, client.host]
    raise UserError(f"{inventory.file}: no link or hub client key {key!r}")


class _Rotator:
    """Runs the steps of one key after another, rendering, deploying and confirming each."""

    def __init__(
        self,
        ws: Workspace,
        inventory: Inventory,
        store: Keystore,
        *,
        wait: float,
        passphrase_env: str | None,
        passphrase_file: Path | None,
        say: Callable[[str], None],
        progress: Callable[[str], None],
    ) -> None:
        self.ws, self.inventory, self.store = ws, inventory, store
        self.wait = wait
        self.passphrase_env, self.passphrase_file = passphrase_env, passphrase_file
        self.say, self.progress = say, progress
        self._secret: bytes | None = None  # the keystore passphrase, read once (encrypted keys)

    def _unlock(self) -> bytes | None:
        """The keystore passphrase, read (or asked) once for the whole run when any key of the
        inventory is stored encrypted; None when none is."""
        names = self.inventory.key_names()
        encrypted = any(self.store.is_encrypted(n) for n in names) or any(
            self.store.key_path(n, staged=True).suffix == ".enc" for n in names
        )
        if encrypted and self._secret is None:
            self._secret = read_passphrase(
                self.passphrase_env, self.passphrase_file, prompt=True, confirm=False
            )
        return self._secret if encrypted else None

    def _deploy(self, hosts: list[str]) -> DeployReport:
        """Render the keystore's present phase into build/ and deploy it to ``hosts``."""
        _, _, files = rendered(self.ws, persist=True)
        write_build(files, self.ws.build_path)
        unlocked = preflight(
            self.ws, self.inventory, hosts, self.passphrase_env, self.passphrase_file,
            passphrase=self._unlock(),
        )  # fmt: skip
        return deploy(
            self.inventory,
            hosts,
            self.ws.build_path,
            unlocked,
            wait=self.wait,
            echo=lambda line: self.progress(f"    {line}"),
        )

    def _confirm(self, step: str | None, unit: str, hosts: list[str], old: str, new: str) -> str:
        """Poll both ends' status until ``step`` shows (bounded by --wait); what was seen."""
        deadline = time.monotonic() + self.wait
        while True:
            left = max(1.0, deadline - time.monotonic())
            status = collect(self.inventory, self.ws.build_path, hosts, timeout=min(10.0, left))
            ends: list[EndStatus] = next((ln.ends for ln in status.links if ln.link == unit), [])
            why = step_verdict(step, ends, old, new)
            if why is None:
                return "; ".join(_describe(end) for end in ends)
            if time.monotonic() >= deadline:
                host = next((h for h in hosts if why.startswith(f"{h}:")), None)
                for name, reason in status.unreachable.items():
                    if name in hosts:
                        host, why = name, f"{name}: unreachable: {reason}"
                raise RotateFailed(step, host, f"not confirmed within {self.wait:g}s: {why}")
            time.sleep(POLL)

    def _run_step(self, result: _Result, step: str | None, number: str, old: str, new: str) -> None:
        """Deploy one phase to both hosts and confirm it; record it in ``result``."""
        what = STEPS.get(step or "", "both ends back on the old key alone")
        self.say(f"{result.key}: step {number} {what}: deploying to {', '.join(result.hosts)}")
        started = time.monotonic()
        entry: dict[str, Any] = {"step": step or "restore", "number": number, "what": what}
        result.steps.append(entry)
        report = self._deploy(result.hosts)
        if not report.ok:
            host, why = _deploy_failure(report, result.hosts)
            entry.update(result="failed", detail=why, seconds=round(time.monotonic() - started, 1))
            raise RotateFailed(step, host, f"the deploy failed: {why}")
        try:
            seen = self._confirm(step, result.unit, result.hosts, old, new)
        except RotateFailed as exc:
            entry.update(
                result="failed", detail=exc.why, seconds=round(time.monotonic() - started, 1)
            )
            raise
        entry.update(result="confirmed", detail=seen, seconds=round(time.monotonic() - started, 1))
        self.say(f"{result.key}: step {number} confirmed: {seen}")

    def _passphrase(self, key: str) -> bytes | None:
        """The keystore passphrase when ``key`` is stored encrypted (checked by loading it), so
        the new key is encrypted like the old one; None for a plain key."""
        if not self.store.is_encrypted(key):
            return None
        passphrase = self._unlock()
        self.store.load(key, passphrase=passphrase)  # a wrong passphrase stops here
        return passphrase

    def rotate(self, result: _Result) -> None:
        """Run (or continue) the rotation of ``result.key`` to its end."""
        key, store = result.key, self.store
        phase = store.rotation_phase(key)
        steps = remaining_steps(phase)
        current = store.info(key)
        staged = store.info(key, staged=True)
        if current is None:
            raise UserError(f"{store.root}: no key for {key!r}; run `vpnctl keygen`")
        if phase == RETIRE:  # promoted already: the old key is the latest retired one
            result.old, result.new = _latest_retired(store, key), current.fingerprint
        else:
            if staged is None:  # as `keygen --rotate` does
                staged = store.generate(key, passphrase=self._passphrase(key), staged=True)
                self.say(f"{key}: new key {staged.fingerprint} staged beside {current.fingerprint}")
            result.old, result.new = current.fingerprint, staged.fingerprint
        if phase is not None:
            self.say(
                f"{key}: continuing a rotation recorded at step {PHASES.index(phase) + 1} ({phase})"
            )
        old, new = str(result.old), str(result.new)
        for step in steps:
            number = f"{PHASES.index(step) + 1}/{len(PHASES)}"
            if step == RETIRE and store.rotation_phase(key) != RETIRE:
                store.promote(key)  # the old key is kept as <key>.retired-<UTC>
            store.set_rotation_phase(key, step)
            self._run_step(result, step, number, old, new)
        store.set_rotation_phase(key, None)
        result.result = "rotated"
        self.say(
            f"{key}: rotated: both ends use {new} alone; the old key {old} is retired "
            "(kept in the keystore)"
        )

    def abort(self, result: _Result) -> None:
        """Walk ``result.key``'s rotation back to its old key alone (vpnctl/rotation.py)."""
        key, store = result.key, self.store
        phase = store.rotation_phase(key)
        back = steps_back(phase)
        if not back:
            raise UserError(f"{key}: no rotation under way; nothing to abort")
        current, staged = store.info(key), store.info(key, staged=True)
        result.old = current.fingerprint if current else None
        result.new = staged.fingerprint if staged else None
        for i, target in enumerate(back, 1):
            store.set_rotation_phase(key, target)
            self._run_step(
                result, target, f"back {i}/{len(back)}", str(result.old), str(result.new)
            )
        result.result = "aborted"
        self.say(
            f"{key}: rotation aborted: both ends use {result.old} alone; the staged key "
            f"{result.new} stays in the keystore (`vpnctl rotate {key}` would use it)"
        )


def _latest_retired(store: Keystore, key: str) -> str | None:
    """The fingerprint of the most recently retired key of ``key`` (None when there is none)."""
    names = sorted(p.name for p in store.root.glob(f"{key}.retired-*.meta.json"))
    for name in reversed(names):
        retired = name.removesuffix(".meta.json")
        info = store.info(retired)
        if info is not None:
            return info.fingerprint
    return None


def _describe(end: EndStatus) -> str:
    used = end.session_key_fingerprint or end.key_fingerprint
    nxt = f", also accepts {end.next_key_fingerprint}" if end.next_key_fingerprint else ""
    return f"{end.host} {end.state}, session key {used}{nxt}"


def _deploy_failure(report: DeployReport, hosts: list[str]) -> tuple[str | None, str]:
    """The first host of ``hosts`` whose deploy failed, and why (one line)."""
    for name in hosts:
        outcome = report.outcomes.get(name)
        if outcome is None:
            continue
        if outcome.error:
            return name, clean_text(f"{name}: {outcome.error.removeprefix(f'{name}: ')}")
        bad = {**outcome.rolled_back, **outcome.waiting}
        if bad:
            link, why = sorted(bad.items())[0]
            state = "rolled back" if link in outcome.rolled_back else "not confirmed"
            return name, clean_text(f"{name}: {link} {state}: {why}")
    return None, "the deploy reported a failure"


def _advice(key: str, exc: RotateFailed, *, aborting: bool) -> str:
    """What the operator can do after a failed step."""
    if aborting:
        return (
            f"the link keeps a key both ends accept; fix the host and run `vpnctl rotate "
            f"--abort {key}` again"
        )
    if exc.step == RETIRE:
        return (
            f"the new key is already current in the keystore and in use at both ends; fix "
            f"the host and run `vpnctl rotate {key}` again to finish (there is no way back "
            "after this step)"
        )
    where = "on its old key" if exc.step == ACCEPT else "on a key both ends accept"
    return (
        f"the link stays up {where}; to continue, fix the host and run `vpnctl rotate {key}` "
        f"again (it resumes at this step); to undo, run `vpnctl rotate --abort {key}`"
    )


def main(  # noqa: PLR0917 - typer maps each option to a parameter
    ctx: typer.Context,
    links: Annotated[
        list[str] | None,
        typer.Argument(help="Links (or hub clients, as <hub>.<client>) whose key to rotate."),
    ] = None,
    all_links: Annotated[
        bool, typer.Option("--all", help="Every link and every hub client's key.")
    ] = False,
    max_age: Annotated[
        str | None,
        typer.Option(
            "--max-age",
            metavar="AGE",
            help="Only keys older than AGE (90d, 12h, 30m, 45s, 2w); a rotation under way is "
            "always continued.",
        ),
    ] = None,
    abort: Annotated[
        bool,
        typer.Option("--abort", help="Go back: the link returns to its old key alone."),
    ] = False,
    wait: Annotated[
        float,
        typer.Option(
            help="Seconds each step has to be confirmed at both ends (and to come up "
            "in its deploy)."
        ),
    ] = DEFAULT_WAIT,
    passphrase_env: PassphraseEnv = None,
    passphrase_file: PassphraseFile = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON document (docs/json/rotate.schema.json); progress goes to stderr.",
        ),
    ] = False,
) -> None:
    """Rotate link keys with no downtime: the new key is first accepted at both ends, then the
    client switches to it (a new session beside the running one), then the old key is retired.

    Each step renders and deploys the two hosts of the link (a reload, never a restart) and is
    confirmed from both daemons' status records before the next begins. A failed step stops
    the command (exit 1) with the step, the host and how to continue or undo; the keystore
    records how far a rotation got, so running the command again continues it. Exit 2 on a
    bad option or name.
    """
    ws = workspace(ctx)
    inventory = ws.load_inventory()
    names = inventory.key_names()
    if all_links and links:
        raise UserError("give link names or --all, not both")
    if not all_links and not links:
        raise UserError(
            f"name a link (or <hub>.<client>), or give --all (keys: {', '.join(names)})"
        )
    if abort and (all_links or max_age is not None):
        raise UserError("--abort takes link names, not --all or --max-age")
    unknown = [name for name in links or [] if name not in names]
    if unknown:
        raise UserError(
            f"{ws.inventory_path}: no link or hub client {', '.join(unknown)} "
            f"(keys: {', '.join(names)})"
        )
    limit = parse_age(max_age, "--max-age") if max_age is not None else None
    store = ws.keystore()
    store.check_directory()
    wanted = list(dict.fromkeys(links or names))
    now = time.time()
    created = {}
    for name in wanted:
        info = store.info(name)
        if info is None:
            raise UserError(f"{store.root}: no key for {name!r}; run `vpnctl keygen` first")
        created[name] = info.created
    due = set(keys_due(created, now, limit))

    def say(line: str) -> None:
        if as_json:
            typer.echo(clean_text(line), err=True)
        else:
            typer.echo(clean_text(line))

    rotator = _Rotator(
        ws,
        inventory,
        store,
        wait=wait,
        passphrase_env=passphrase_env,
        passphrase_file=passphrase_file,
        say=say,
        progress=(lambda line: typer.echo(clean_text(line), err=True)) if as_json else say,
    )
    results: list[_Result] = []
    failed = False
    for name in wanted:
        unit, hosts = key_ends(inventory, name)
        result = _Result(name, unit, hosts)
        results.append(result)
        if failed:
            continue  # after a failure nothing else is started
        if name not in due and store.rotation_phase(name) is None and not abort:
            age = format_age(now - created[name])
            result.result = "skipped"
            say(f"{name}: skipped: its key is {age} old, not older than --max-age {max_age}")
            continue
        try:
            (rotator.abort if abort else rotator.rotate)(result)
        except RotateFailed as exc:
            failed = True
            result.result = "failed"
            number = f"{PHASES.index(exc.step) + 1}" if exc.step in PHASES else "restore"
            result.error = {
                "step": exc.step or "restore",
                "host": exc.host,
                "why": clean_text(exc.why),
                "advice": _advice(name, exc, aborting=abort),
            }
            say(
                f"{name}: step {number} ({exc.step or 'restore'}) FAILED"
                f"{f' at {exc.host}' if exc.host else ''}: {exc.why}"
            )
            say(f"{name}: {result.error['advice']}")
    if as_json:
        doc = {
            "version": 1,
            "ok": not failed,
            "abort": abort,
            "max_age": max_age,
            "links": [r.to_json() for r in results],
        }
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        counts = {
            k: sum(r.result == k for r in results)
            for k in ("rotated", "aborted", "skipped", "failed", "not started")
        }
        say(", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing to do")
    if failed:
        raise typer.Exit(EXIT_FAILED)
