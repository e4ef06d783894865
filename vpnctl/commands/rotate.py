"""``vpnctl rotate LINK… | --all [--max-age 90d]``: replace link keys with no downtime.

Each key goes through the three steps of :mod:`vpnctl.rotation` (accept, switch, retire) with
the machinery the operator already uses: the keystore (``keygen --rotate``/``--promote``),
``render`` and ``deploy`` (which reloads, never restarts, a link whose keys alone changed).
Many keys go through the steps together (:func:`vpnctl.rotation.step_batches`): a step of every
key that has it is rendered once, deployed once to the union of their hosts (in parallel, as
``deploy --all``) and then the daemons' status records are read over ssh (``vpnctl status``'s
way) until both ends of each key show the step took effect, within ``--wait`` seconds; only then
does the next step start. A key whose step fails (a host unreachable, a rollback, no
confirmation) is named with its step and host and left at that phase -- held as it is by the
later steps' deploys (:func:`vpnctl.deploy.plan.hold_links`) -- while the others finish; the
keystore records each key's phase, so running the command again continues each key from its
own phase, and ``--abort`` walks keys back.

A step deploys the keys' changes and nothing else: when the plan of a step's deploy would also
change something the rotation does not (another link's pending edit on the same host, a new
runtime, a link to start or remove: :func:`vpnctl.rotation.unrelated_changes`), the step is
refused before anything is applied, listing those changes, unless ``--include-pending``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from vpnctl.commands.deploy import preflight
from vpnctl.commands.keygen import read_passphrase
from vpnctl.commands.render import rendered
from vpnctl.deploy import DEFAULT_WAIT, DeployReport, HostOutcome, deploy
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
    abort_batches,
    keys_due,
    parse_age,
    remaining_steps,
    step_batches,
    step_verdict,
    steps_back,
    unrelated_changes,
)
from vpnctl.workspace import EXIT_FAILED, PassphraseEnv, PassphraseFile, Workspace, workspace

__all__ = ["RotateFailed", "deploy_failures", "key_ends", "main"]

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
    result: str = "not started"  # rotated | aborted | failed | refused | skipped | not started
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    failure: RotateFailed | None = None  # the step that failed in this run

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


class _Refused(Exception):
    """A step's deploy would change more than the rotation: nothing was applied anywhere."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("; ".join(lines))
        self.lines = lines


class _Rotator:
    """Runs the keys' steps in batches: each step of every key that has it is rendered once,
    deployed once to the union of their hosts and confirmed for every key, then the next."""

    def __init__(
        self,
        ws: Workspace,
        inventory: Inventory,
        store: Keystore,
        *,
        wait: float,
        passphrase_env: str | None,
        passphrase_file: Path | None,
        include_pending: bool,
        say: Callable[[str], None],
        progress: Callable[[str], None],
    ) -> None:
        self.ws, self.inventory, self.store = ws, inventory, store
        self.wait = wait
        self.passphrase_env, self.passphrase_file = passphrase_env, passphrase_file
        self.include_pending = include_pending
        self.say, self.progress = say, progress
        self._secret: bytes | None = None  # the keystore passphrase, read once (encrypted keys)
        self.held: dict[str, str] = {}  # key -> why: failed earlier in this run, left as it is
        self.run_keys: list[str] = []  # every key of this run: those not in a batch are held

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

    def _deploy(self, hosts: list[str], keys: list[str]) -> DeployReport:
        """Render the keystore's present phases into build/ and deploy ``keys``' step to
        ``hosts``: the run's other keys (later in the run, or failed earlier) are held as they
        are, and unless --include-pending a plan that changes more than ``keys`` stops the
        deploy before anything is applied."""
        _, _, files = rendered(self.ws, persist=True)
        write_build(files, self.ws.build_path)
        unlocked = preflight(
            self.ws, self.inventory, hosts, self.passphrase_env, self.passphrase_file,
            passphrase=self._unlock(),
        )  # fmt: skip

        def guard(outcomes: Mapping[str, HostOutcome], manifests: Mapping[str, Any]) -> None:
            lines = []
            for name in hosts:
                plan = outcomes[name].plan
                if plan is not None:
                    lines += unrelated_changes(plan, manifests[name], keys)
            if lines:
                raise _Refused(lines)

        later = "its step comes in another batch of this run"
        hold = {k: later for k in self.run_keys if k not in keys} | self.held
        return deploy(
            self.inventory,
            hosts,
            self.ws.build_path,
            unlocked,
            wait=self.wait,
            echo=lambda line: self.progress(f"    {line}"),
            hold=hold,
            before_apply=None if self.include_pending else guard,
        )

    def _confirm(self, step: str | None, batch: list[_Result]) -> dict[str, str | RotateFailed]:
        """Poll the status of every key of ``batch`` (its hosts only) until each shows
        ``step``, bounded by --wait: key -> what was seen, or why it was not confirmed."""
        out: dict[str, str | RotateFailed] = {}
        pending = {r.key: r for r in batch}
        deadline = time.monotonic() + self.wait
        while pending:
            left = max(1.0, deadline - time.monotonic())
            hosts = list(dict.fromkeys(h for r in pending.values() for h in r.hosts))
            status = collect(self.inventory, self.ws.build_path, hosts, timeout=min(10.0, left))
            units = {ln.link: ln.ends for ln in status.links}
            whys = {}
            for key, r in list(pending.items()):
                ends: list[EndStatus] = units.get(r.unit, [])
                why = step_verdict(step, ends, str(r.old), str(r.new))
                if why is None:
                    out[key] = "; ".join(_describe(end) for end in ends)
                    del pending[key]
                else:
                    whys[key] = why
            if not pending:
                break
            if time.monotonic() >= deadline:
                for key, r in pending.items():
                    why = whys[key]
                    host = next((h for h in r.hosts if why.startswith(f"{h}:")), None)
                    for name, reason in status.unreachable.items():
                        if name in r.hosts:
                            host, why = name, f"{name}: unreachable: {reason}"
                    out[key] = RotateFailed(
                        step, host, f"not confirmed within {self.wait:g}s: {why}"
                    )
                break
            time.sleep(POLL)
        return out

    def _run_batch(
        self, step: str | None, batch: list[_Result], number: Callable[[_Result], str]
    ) -> None:
        """Deploy one phase for every key of ``batch`` at once and confirm each; a key that
        fails is marked in its result (and held for the rest of the run), the others go on.
        Raises _Refused (nothing applied) when the deploy would change more than these keys."""
        what = STEPS.get(step or "", "both ends back on the old key alone")
        hosts = list(dict.fromkeys(h for r in batch for h in r.hosts))
        names = ", ".join(r.key for r in batch)
        labels = {number(r) for r in batch}  # an abort's keys may walk back different lengths
        label = labels.pop() if len(labels) == 1 else (step or "restore")
        self.say(f"step {label} {what}: {names}: deploying to {len(hosts)} host(s): "
                 f"{', '.join(hosts)}")  # fmt: skip
        started = time.monotonic()
        entries = {}
        for r in batch:
            entries[r.key] = {"step": step or "restore", "number": number(r), "what": what}
            r.steps.append(entries[r.key])
        try:
            report = self._deploy(hosts, [r.key for r in batch])
        except _Refused:
            for r in batch:
                r.steps.remove(entries[r.key])
            raise
        failures = deploy_failures(report.outcomes, {r.key: (r.unit, r.hosts) for r in batch})
        for r in batch:
            if r.key in failures:
                host, why = failures[r.key]
                self._fail(r, entries[r.key], RotateFailed(step, host, f"the deploy failed: {why}"),
                           started)  # fmt: skip
        seen = self._confirm(step, [r for r in batch if r.key not in failures])
        for r in batch:
            if r.key not in seen:
                continue
            result = seen[r.key]
            if isinstance(result, RotateFailed):
                self._fail(r, entries[r.key], result, started)
                continue
            entries[r.key].update(result="confirmed", detail=result,
                                  seconds=round(time.monotonic() - started, 1))  # fmt: skip
            self.say(f"{r.key}: step {number(r)} confirmed: {result}")

    def _fail(self, r: _Result, entry: dict[str, Any], exc: RotateFailed, started: float) -> None:
        entry.update(result="failed", detail=exc.why, seconds=round(time.monotonic() - started, 1))
        r.failure = exc
        number = f"{PHASES.index(exc.step) + 1}" if exc.step in PHASES else "restore"
        self.held[r.key] = (
            f"its rotation stopped at step {number} ({exc.step or 'restore'}) earlier in this run"
        )

    def _passphrase(self, key: str) -> bytes | None:
        """The keystore passphrase when ``key`` is stored encrypted (checked by loading it), so
        the new key is encrypted like the old one; None for a plain key."""
        if not self.store.is_encrypted(key):
            return None
        passphrase = self._unlock()
        self.store.load(key, passphrase=passphrase)  # a wrong passphrase stops here
        return passphrase

    def _prepare(self, result: _Result) -> str | None:
        """Stage ``result.key``'s new key if needed and fill in the two fingerprints; its
        recorded phase (None: a rotation not started)."""
        key, store = result.key, self.store
        phase = store.rotation_phase(key)
        remaining_steps(phase)  # an unknown phase stops here
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
        return phase

    def rotate(self, results: list[_Result]) -> None:
        """Run (or continue) the rotation of every key of ``results`` to its end, batched."""
        store = self.store
        by_key = {r.key: r for r in results}
        self.run_keys = list(by_key)
        phases = {r.key: self._prepare(r) for r in results}
        for step, keys in step_batches(phases):
            batch = [by_key[k] for k in keys if by_key[k].failure is None]
            if not batch:
                continue
            before = {r.key: store.rotation_phase(r.key) for r in batch}
            for r in batch:
                if step == RETIRE and store.rotation_phase(r.key) != RETIRE:
                    store.promote(r.key)  # the old key is kept as <key>.retired-<UTC>
                store.set_rotation_phase(r.key, step)
            try:
                self._run_batch(
                    step, batch, lambda _r, s=step: f"{PHASES.index(s) + 1}/{len(PHASES)}"
                )
            except _Refused:
                if step != RETIRE:  # nothing was deployed: the records say where the links are
                    for r in batch:
                        store.set_rotation_phase(r.key, before[r.key])
                raise
        for r in results:
            if r.failure is not None:
                continue
            store.set_rotation_phase(r.key, None)
            r.result = "rotated"
            self.say(
                f"{r.key}: rotated: both ends use {r.new} alone; the old key {r.old} is retired "
                "(kept in the keystore)"
            )

    def abort(self, results: list[_Result]) -> None:
        """Walk every key of ``results`` back to its old key alone (vpnctl/rotation.py), batched."""
        store = self.store
        by_key = {r.key: r for r in results}
        self.run_keys = list(by_key)
        phases = {r.key: store.rotation_phase(r.key) for r in results}
        batches = abort_batches(phases)
        total = {k: len(steps_back(p)) for k, p in phases.items()}
        done: dict[str, int] = dict.fromkeys(phases, 0)
        for r in results:
            current, staged = store.info(r.key), store.info(r.key, staged=True)
            r.old = current.fingerprint if current else None
            r.new = staged.fingerprint if staged else None
        for target, keys in batches:
            batch = [by_key[k] for k in keys if by_key[k].failure is None]
            if not batch:
                continue
            before = {r.key: store.rotation_phase(r.key) for r in batch}
            for r in batch:
                done[r.key] += 1
                store.set_rotation_phase(r.key, target)
            try:
                self._run_batch(target, batch, lambda r: f"back {done[r.key]}/{total[r.key]}")
            except _Refused:
                for r in batch:
                    store.set_rotation_phase(r.key, before[r.key])
                raise
        for r in results:
            if r.failure is not None:
                continue
            r.result = "aborted"
            self.say(
                f"{r.key}: rotation aborted: both ends use {r.old} alone; the staged key "
                f"{r.new} stays in the keystore (`vpnctl rotate {r.key}` would use it)"
            )


def deploy_failures(
    outcomes: Mapping[str, HostOutcome], keys: Mapping[str, tuple[str, list[str]]]
) -> dict[str, tuple[str | None, str]]:
    """The keys whose step the deploy did not carry out, each with the host and why (one
    line): ``keys`` maps a keystore key to (its status unit, [its two hosts]). A key fails when
    either host failed (probe, apply or an unrelated error: nothing of it was applied there, or
    it was rolled back) or when the key's link was rolled back, left unconfirmed or not applied
    at one of them; the other keys of the deploy are not affected."""
    out: dict[str, tuple[str | None, str]] = {}
    for key, (unit, hosts) in keys.items():
        for name in hosts:
            outcome = outcomes.get(name)
            if outcome is not None and outcome.error:
                out[key] = (name, clean_text(f"{name}: {outcome.error.removeprefix(f'{name}: ')}"))
                break
        if key in out:
            continue
        for i, name in enumerate(hosts):
            outcome = outcomes.get(name)
            if outcome is None:
                continue
            names = [unit, key]
            if "/" in unit and i == 1:  # a hub client's end is the hub's name in its manifest
                names.append(unit.split("/", 1)[0])
            for table, state in ((outcome.rolled_back, "rolled back"),
                                 (outcome.waiting, "not confirmed"),
                                 (outcome.skipped, "not applied")):  # fmt: skip
                link = next((n for n in names if n in table), None)
                if link is not None:
                    why = table[link].removeprefix("not applied: ")
                    out[key] = (name, clean_text(f"{name}: {link} {state}: {why}"))
                    break
            if key in out:
                break
    return out


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
    include_pending: Annotated[
        bool,
        typer.Option(
            "--include-pending",
            help="Also deploy rendered changes that are not part of the rotation (other links "
            "of the same hosts, a new runtime); without it such a step is refused.",
        ),
    ] = False,
) -> None:
    """Rotate link keys with no downtime: the new key is first accepted at both ends, then the
    client switches to it (a new session beside the running one), then the old key is retired.

    The keys named (or --all) take each step together: it is rendered once, deployed to all
    their hosts at once (a reload, never a restart) and confirmed from both daemons' status
    records of every key before the next step begins. A key whose step fails is named with the
    step and the host and stops there while the others finish (exit 1); the keystore records
    how far each rotation got, so running the command again continues it. A step that would
    also deploy changes that are not part of the rotation (another link's pending edit on the
    same hosts, say) is refused before anything is applied, listing them, unless
    --include-pending. Exit 2 on a bad option or name.
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
        include_pending=include_pending,
        say=say,
        progress=(lambda line: typer.echo(clean_text(line), err=True)) if as_json else say,
    )
    results: list[_Result] = []
    todo: list[_Result] = []
    for name in wanted:
        unit, hosts = key_ends(inventory, name)
        result = _Result(name, unit, hosts)
        results.append(result)
        if name not in due and store.rotation_phase(name) is None and not abort:
            age = format_age(now - created[name])
            result.result = "skipped"
            say(f"{name}: skipped: its key is {age} old, not older than --max-age {max_age}")
            continue
        todo.append(result)
    refused: _Refused | None = None
    if todo:
        try:
            (rotator.abort if abort else rotator.rotate)(todo)
        except _Refused as exc:
            refused = exc
    for result in todo:
        exc = result.failure
        if exc is None:
            if refused is not None:
                result.result = "refused"
            continue
        result.result = "failed"
        number = f"{PHASES.index(exc.step) + 1}" if exc.step in PHASES else "restore"
        result.error = {
            "step": exc.step or "restore",
            "host": exc.host,
            "why": clean_text(exc.why),
            "advice": _advice(result.key, exc, aborting=abort),
        }
        say(
            f"{result.key}: step {number} ({exc.step or 'restore'}) FAILED"
            f"{f' at {exc.host}' if exc.host else ''}: {exc.why}"
        )
        say(f"{result.key}: {result.error['advice']}")
    if refused is not None:
        hosts = list(dict.fromkeys(line.split(":", 1)[0] for line in refused.lines))
        say("refused: the next step would also deploy changes that are not part of this "
            "rotation; nothing of it was deployed:")  # fmt: skip
        for line in refused.lines:
            say(f"  {line}")
        say(f"deploy those first (`vpnctl deploy {' '.join(hosts)}`; it may restart the links "
            "named), then run this command again; or give --include-pending to deploy them "
            "with the rotation")  # fmt: skip
    failed = refused is not None or any(r.result == "failed" for r in results)
    if as_json:
        doc = {
            "version": 1,
            "ok": not failed,
            "abort": abort,
            "max_age": max_age,
            "links": [r.to_json() for r in results],
            "pending": refused.lines if refused is not None else [],
        }
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        counts = {
            k: sum(r.result == k for r in results)
            for k in ("rotated", "aborted", "skipped", "failed", "refused", "not started")
        }
        say(", ".join(f"{n} {k}" for k, n in counts.items() if n) or "nothing to do")
    if failed:
        raise typer.Exit(EXIT_FAILED)
