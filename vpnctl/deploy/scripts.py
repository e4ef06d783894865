"""The remote scripts: POSIX sh run on a host over ssh (every path quoted; no secret ever in a
command line). Probe, runtime install, apply, rollback, commit and status all live here."""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from vpnctl.deploy.common import COMPLETE, RUNTIME_DIR, RUNTIME_LINK, STATE_DIR, UNIT_DIR, HostPlan
from vpnctl.deploy.runtime import TARGET_PY
from vpnctl.ssh import quote


def _run_as(manifest: Mapping[str, Any]) -> tuple[str, str] | None:
    """(user, group) the host's daemons run as (the rendered ``user``/``group``), or None."""
    run_as = manifest.get("run_as")
    return (run_as[0], run_as[1]) if run_as else None


def _account_sh(run_as: tuple[str, str] | None) -> str:
    """Create the system account vpnd runs as, unless it exists (idempotent; no home, no
    shell). Before the files are unpacked, so they can be handed to it."""
    if run_as is None:
        return ""
    user, group = quote(run_as[0]), quote(run_as[1])
    fail = quote(f"apply-failed: cannot create the account {run_as[0]}:{run_as[1]}")
    return (
        f"{{ getent group {group} >/dev/null || groupadd --system {group}; }} && "
        f"{{ id -u {user} >/dev/null 2>&1 || useradd --system --gid {group} --no-create-home "
        f"--home-dir /nonexistent --shell /usr/sbin/nologin {user}; }} || "
        f"{{ echo {fail} >&2; exit 3; }}"
    )


def _rt(prefix: str, *parts: str) -> str:
    return posixpath.join(prefix, RUNTIME_DIR, *parts)


def _runtime_bin(prefix: str) -> str:
    return posixpath.join(prefix, RUNTIME_LINK)


# Shell builtins only (no process started): a host's probe and status run these once per link,
# and a fork+exec per step made a 19-link host's status cost ~0.2 CPU-s (now ~0.03).
# `alive PID`: a live, non-zombie process (the state after the last ") " of /proc/PID/stat);
# `rdpid FILE`: the first line of a pidfile into $rp (empty when there is none).
_SH_FUNCS = r"""
alive() {
  case $1 in ''|*[!0-9]*) return 1;; esac
  [ -r "/proc/$1/stat" ] || return 1
  st=; { IFS= read -r st || :; } 2>/dev/null < "/proc/$1/stat"
  case ${st##*) } in ''|Z*) return 1;; esac
}
rdpid() { rp=; [ -f "$1" ] || return 0; { IFS= read -r rp || :; } 2>/dev/null < "$1"; }
pid_of() { rdpid "$1"; [ -n "$rp" ] && echo "$rp"; }
nl='
'
"""


#: `locked FILE`: true while a process holds a flock on FILE (vpnd holds its pidfile's).
_SH_LOCKED = r"""
locked() {
  [ -f "$1" ] || return 1
  if command -v flock >/dev/null 2>&1; then flock -n -s "$1" true; [ $? -eq 1 ]; return; fi
  python3 -c 'import fcntl, sys
f = open(sys.argv[1])
try: fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
except BlockingIOError: sys.exit(0)
sys.exit(1)' "$1"
}
"""


def probe_script(manifest: Mapping[str, Any], paths: Iterable[str]) -> str:
    """One shell script reporting stamp, systemd, python, target, file hashes/modes, running
    links."""
    prefix = manifest["prefix"]
    lines = [_SH_FUNCS, _SH_LOCKED]
    lines.append(f'echo "stamp $(cat {quote(_rt(prefix, "STAMP"))} 2>/dev/null || echo -)"')
    lines.append(
        'if [ -d /run/systemd/system ]; then echo "systemd yes"; else echo "systemd no"; fi'
    )
    lines.append('echo "python $(command -v python3 || echo -)"')
    # the target: cached by the install in the current venv, keyed by the python3 on PATH (path,
    # inode, size, mtime); asked of python3 when the key differs or the venv's interpreter is gone
    cache = quote(_rt(prefix, "current", TARGET_CACHE))
    lines.append(f"k=$({PY_KEY_SH}); t=")
    lines.append(
        f'if [ -n "$k" ] && [ -f {cache} ] && [ "$(head -n 1 {cache})" = "$k" ] && '
        f'[ -e "$(readlink -f {quote(_rt(prefix, "current", "bin", "python"))})" ]; then '
        f"t=$(sed -n 2p {cache}); fi"
    )
    lines.append(f'[ -n "$t" ] || t=$(python3 -S -c {quote(TARGET_PY)} 2>/dev/null) || t=-')
    lines.append('echo "target ${t%%|*}"; echo "pyexe ${t#*|}"')
    lines.append('echo "uid $(id -u)"')
    lines.append(  # the runtimes already complete on the host: one may be reused
        f"echo venvs $(cd {quote(_rt(prefix))} 2>/dev/null && for d in venv-*; do "
        f'[ -e "$d/{COMPLETE}" ] && echo "${{d#venv-}}"; done)'
    )
    pending = posixpath.join(prefix, STATE_DIR, "pending")
    lines.append(f'if [ -e {quote(pending)} ]; then echo "pending yes"; else echo "pending no"; fi')
    lines.append(_files_sh(paths))
    links = dict(manifest["links"])
    deployed = posixpath.join(prefix, STATE_DIR, "manifest.json")
    lines.append(f'echo "deployed $(base64 -w0 {quote(deployed)} 2>/dev/null || echo -)"')
    for link, entry in sorted(links.items()):
        pf = quote(entry["pidfile"])
        lines.append(
            f'if {{ rdpid {pf}; alive "$rp" && locked {pf}; }} || '
            f"{{ [ -d /run/systemd/system ] && systemctl is-active --quiet "
            f'{quote(f"vpnd-{link}")} 2>/dev/null; }}; then echo "running {link} yes"; '
            f'else echo "running {link} no"; fi'
        )
    return "\n".join(lines) + "\n"


def _files_sh(paths: Iterable[str]) -> str:
    """``file IDX SHA256 MODE USER:GROUP`` (or ``file IDX - -``) for each path that is a regular
    file, from one ``sha256sum`` and one ``stat`` over all of them (not two processes per file:
    a host with many links has many files); each answer is found by its file name, so a file
    that vanished in between is reported absent rather than given another file's hash."""
    paths = list(paths)
    if not paths:
        return ""
    out = [f"set -- {quote(*paths)}", 'n=$#; for f; do [ -f "$f" ] && set -- "$@" "$f"; done',
           'shift "$n"', 'sums=; modes=',
           'if [ $# -gt 0 ]; then sums=$(sha256sum -- "$@" 2>/dev/null); '
           "modes=$(stat -c '%a %U:%G %n' -- \"$@\" 2>/dev/null); fi",
           'sums=$nl$sums$nl; modes=$nl$modes$nl']  # fmt: skip
    for idx, path in enumerate(paths):
        q = quote(path)
        out.append(
            f'h=${{sums%%"  "{q}"$nl"*}}; m=${{modes%%" "{q}"$nl"*}}; '
            f'if [ "$h" != "$sums" ] && [ "$m" != "$modes" ]; then '
            f'echo "file {idx} ${{h##*"$nl"}} ${{m##*"$nl"}}"; else echo "file {idx} - -"; fi'
        )
    return "\n".join(out)


LOCK_WAIT = 60  # seconds a deploy step waits for another deploy's lock on the same host


def _lock_sh(prefix: str) -> str:
    """Take the host's deploy lock (``flock`` on fd 9) for the rest of the script, so two
    deploys (two operators, or one host named twice) never interleave apply/rollback/commit.
    Daemons started under it close fd 9 (``9>&-``) so they do not hold it."""
    state = quote(posixpath.join(prefix, STATE_DIR))
    return (
        f"mkdir -p {state} && exec 9>{state}/lock || exit 5\n"
        f"if command -v flock >/dev/null 2>&1; then flock -w {LOCK_WAIT} 9 || "
        "{ echo 'locked: another deploy is running on this host' >&2; exit 5; }; fi\n"
    )


def _stop_sh(link: str, entry: Mapping[str, Any], use_systemd: bool) -> str:
    """Stop one link's daemon and wait (bounded) until it is gone.

    Without systemd the PID comes from the pidfile, and it is signalled only while the pidfile
    is still flock-locked (vpnd holds that lock for its whole life): a stale pidfile whose PID
    the kernel has since given to another process never gets that process killed."""
    if use_systemd:
        return f"systemctl stop {quote(f'vpnd-{link}')} 2>/dev/null || true\n"
    pf = quote(entry["pidfile"])
    return (
        f'pid=$(pid_of {pf}); if locked {pf} && alive "$pid"; then kill -TERM "$pid"; i=0; '
        f'while alive "$pid" && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; '
        f'alive "$pid" && locked {pf} && kill -KILL "$pid"; fi; rm -f {pf}\n'
    )


def _start_sh(
    link: str,
    entry: Mapping[str, Any],
    prefix: str,
    use_systemd: bool,
    run_as: tuple[str, str] | None = None,
) -> str:
    """Start one link's daemon; a failure prints `start-failed <link>: <message>`. Without
    systemd the daemon starts as root and drops to `run_as`, whose run directories these are."""
    if use_systemd:
        unit = quote(f"vpnd-{link}")
        return (
            f"systemctl daemon-reload && systemctl enable --quiet {unit} && "
            f"systemctl restart {unit} || "
            f"echo {quote(f'start-failed {link}: systemctl restart failed')}\n"
        )
    rundir = quote(posixpath.dirname(entry["pidfile"]))
    statusdir = quote(posixpath.dirname(entry["statusfile"]))
    own = f"chown {quote(run_as[0])}:{quote(run_as[1])} {rundir} {statusdir}; " if run_as else ""
    return (
        f"mkdir -p {rundir} {statusdir}; {own}out=$({quote(_runtime_bin(prefix))} -f "
        f"{quote(entry['config'])} --daemon </dev/null 9>&- 2>&1) || "
        f'echo {quote(f"start-failed {link}:")} "$(echo "$out" | tail -n 1)"\n'
    )


def _reload_sh(link: str, entry: Mapping[str, Any], use_systemd: bool) -> str:
    """SIGHUP a hub so it re-reads its peers directory (HUB-SPEC.md: unchanged clients keep
    their sessions), or a link whose keys alone changed (a rotation step: its session stays);
    a failure prints `start-failed <link>: ...` like a failed start."""
    if use_systemd and entry.get("role") != "hub":  # a link's unit has no ExecReload: SIGHUP it
        unit = quote(f"vpnd-{link}")
        return (f"systemctl kill --kill-who=main --signal=HUP {unit} || "
                f"echo {quote(f'start-failed {link}: systemctl kill failed')}\n")  # fmt: skip
    if use_systemd:
        unit = quote(f"vpnd-{link}")
        return (f"systemctl reload {unit} || "
                f"echo {quote(f'start-failed {link}: systemctl reload failed')}\n")  # fmt: skip
    pf = quote(entry["pidfile"])
    return (
        f'pid=$(pid_of {pf}); if alive "$pid"; then kill -HUP "$pid"; else '
        f"echo {quote(f'start-failed {link}: not running, cannot reload')}; fi\n"
    )


# The probe's target answer, cached by the install in the venv (line 1: PY_KEY_SH's key).
TARGET_CACHE = ".vpnctl-target"
# What identifies the python3 on PATH without running it: its path, inode, size and mtime.
PY_KEY_SH = "p=$(command -v python3) && stat -L -c '%n %i %s %Y' \"$p\" 2>/dev/null"
# Imported once by the install: what `vpnd -f CONF --daemon` imports before it detaches.
WARM_PY = "import vpnd_runtime.cli, vpnd_runtime.process, vpnd_runtime.daemon"


def install_runtime_script(
    prefix: str, stamp: str, python: str | None = None, target_line: str | None = None
) -> str:
    """Unpack the wheelhouse (tar on stdin) into a new venv and switch `current` to it.

    The wheels are unpacked by ``tools/wheel_install.py`` (no pip, no resolver: the set is
    resolved already; hashes checked against each RECORD) into ``venv-<stamp>``, which is
    marked complete only at the end, after the daemon's modules were imported once: that proves
    the runtime imports on this host, and writes their bytecode once (daemons started together
    would each compile them otherwise). A complete ``venv-<stamp>`` already on the host (same
    wheels, same target, same installer) is reused as it is: nothing unpacked, stdin ignored.
    `python` is the interpreter the probe found (its real path: no PATH lookup or version
    manager shim per step); default ``python3``. `target_line` (the probe's ``target|pyexe``
    answer) is cached in the venv for later probes, keyed by the python3 on PATH."""
    rt = quote(_rt(prefix))
    venv = f"venv-{stamp}"
    cached, cache = quote(target_line or ""), f"{rt}/{venv}/{TARGET_CACHE}"
    return f"""set -e
umask 022
mkdir -p {rt} {quote(posixpath.dirname(_runtime_bin(prefix)))}
if [ -e {rt}/{venv}/{COMPLETE} ]; then
  echo "runtime-reused {stamp}"
else
  wh=$(mktemp -d {rt}/wheels.XXXXXX)
  trap 'rm -rf "$wh"' EXIT
  tar -x -f - -C "$wh"
  rm -rf {rt}/{venv}
  {quote(python or "python3")} -m venv --without-pip {rt}/{venv}
  {rt}/{venv}/bin/python "$wh"/tools/wheel_install.py {rt}/{venv} "$wh"/*.whl
  PYTHONDONTWRITEBYTECODE= {rt}/{venv}/bin/python -c {quote(WARM_PY)}
  if [ -n {cached} ]; then
    k=$({PY_KEY_SH}) || k=; [ -z "$k" ] || printf '%s\\n%s\\n' "$k" {cached} > {cache}
  fi
  : > {rt}/{venv}/{COMPLETE}
fi
old=$(readlink {rt}/current 2>/dev/null || true)
if [ -n "$old" ] && [ "$old" != {venv} ]; then ln -sfn "$old" {rt}/previous; fi
ln -sfn {venv} {rt}/current.new && mv -T {rt}/current.new {rt}/current
ln -sfn {rt}/current/bin/vpnd {quote(_runtime_bin(prefix))}
echo {stamp} > {rt}/STAMP
for d in {rt}/venv-*; do
  b=$(basename "$d"); [ "$b" = {venv} ] || [ "$b" = "$old" ] || rm -rf "$d"
done
"""


def apply_script(
    plan: HostPlan,
    manifest: Mapping[str, Any],
    deployed: Mapping[str, Any],
    *,
    defer: Iterable[str] = (),
) -> str:
    """Back up the changed links' files, unpack the new ones (stdin), stop removed links,
    (re)start changed and stopped links -- except those in `defer`, which are stopped here and
    started later by :func:`start_script` (a client end waits for its server's listener)."""
    prefix = manifest["prefix"]
    state = posixpath.join(prefix, STATE_DIR)
    backup, pending = quote(f"{state}/prev"), quote(f"{state}/pending")
    out = [_SH_FUNCS, _SH_LOCKED, _lock_sh(prefix), 'echo "applied-at $(date +%s.%N)"', "umask 077"]
    # The backup holds the last *committed* version of each file. A pending marker means an
    # earlier deploy was interrupted after it started changing files: its backup is kept and
    # files it already backed up are not backed up again (they may be uncommitted now).
    out.append(f"[ -e {pending} ] || rm -rf {backup}")
    out.append(f"mkdir -p {backup}/files {backup}/absent && : > {pending} || "
               "{ echo 'apply-failed: cannot write the backup' >&2; exit 3; }")  # fmt: skip
    out.append(f"sync -f {pending} 2>/dev/null || true")
    pruned = [path for _, paths in sorted(plan.prune.items()) for path in paths]
    for path in [item.path for item in plan.files] + pruned:
        src = quote(path)
        saved, absent = _backup_paths(prefix, path)
        out.append(
            f"if [ ! -e {saved} ] && [ ! -e {absent} ]; then "
            f'if [ -f {src} ]; then mkdir -p "$(dirname {saved})" && cp -p {src} {saved}; '
            f'else mkdir -p "$(dirname {absent})" && : > {absent}; fi || '
            f"{{ rm -f {saved}; echo {quote(f'apply-failed: cannot back up {path}')} >&2; "
            "exit 3; }; fi"
        )
    run_as = _run_as(manifest)
    if run_as:
        out.append(_account_sh(run_as))
    out.append("tar -x -p --no-same-owner -f - -C / || { echo 'apply-failed: tar'; exit 3; }")
    if run_as:  # the user reads its configs and keys (at start under systemd's User=, and again
        # on every SIGHUP: a key rotation's next key is read after the drop)
        owner = f"{quote(run_as[0])}:{quote(run_as[1])}"
        for item in plan.files:
            if item.kind == "config":
                out.append(f"chmod 0755 {quote(posixpath.dirname(item.path))}")
            elif item.kind in ("key", "nextkey"):
                out.append(f"chown {owner} {quote(item.path)}")
            elif item.kind in ("peerkey", "peernextkey"):  # a hub reads its peers dir on SIGHUP
                peers = quote(posixpath.dirname(item.path))
                out.append(f"chown {owner} {quote(item.path)} && chown root:{quote(run_as[1])} "
                           f"{peers} && chmod 0750 {peers}")  # fmt: skip
    for path in pruned:  # peer files and keys of clients removed from a hub, old nextkey files
        out.append(f"rm -f {quote(path)}")
    for link in plan.removed:
        entry = deployed.get("links", {}).get(link, {})
        if entry.get("pidfile"):
            out.append(_stop_sh(link, entry, plan.use_systemd))
        for key in ("config", "keyfile", "statusfile"):
            if entry.get(key):
                out.append(f"rm -f {quote(entry[key])}")
        if plan.use_systemd:
            out.append(f"systemctl disable --quiet {quote(f'vpnd-{link}')} 2>/dev/null || true")
            out.append(f"rm -f {quote(posixpath.join(UNIT_DIR, f'vpnd-{link}.service'))}")
    restarts = [(link, manifest["links"][link]) for link in plan.restarts]
    out.append(_together([_stop_sh(link, entry, plan.use_systemd) for link, entry in restarts],
                         plan.use_systemd))  # fmt: skip
    out.append(_starts_sh([link for link in plan.restarts if link not in set(defer)], plan,
                          manifest, run_as))  # fmt: skip
    for link in sorted(plan.reload):  # hubs whose peers directory changed: SIGHUP only
        out.append(_reload_sh(link, manifest["links"][link], plan.use_systemd))
    return "\n".join(out) + "\n"


def _together(snippets: list[str], use_systemd: bool) -> str:
    """Run the shell `snippets` (stops or starts of different links) at the same time and wait
    for all; one by one under systemd (systemctl serialises them anyway)."""
    if use_systemd or len(snippets) < 2:
        return "".join(snippets)
    return "".join(f"( {s.strip()}\n) &\n" for s in snippets) + "wait\n"


def _starts_sh(
    links: Iterable[str],
    plan: HostPlan,
    manifest: Mapping[str, Any],
    run_as: tuple[str, str] | None,
) -> str:
    """Start `links` (all at once without systemd); failures print ``start-failed``."""
    prefix = manifest["prefix"]
    return _together([_start_sh(link, manifest["links"][link], prefix, plan.use_systemd, run_as)
                      for link in links], plan.use_systemd)  # fmt: skip


def start_script(plan: HostPlan, manifest: Mapping[str, Any], links: Iterable[str]) -> str:
    """Start the links an apply deferred (client ends, once their servers listen); under the
    host's deploy lock, like the apply."""
    out = [_SH_FUNCS, _SH_LOCKED, _lock_sh(manifest["prefix"])]
    out.append(_starts_sh(sorted(links), plan, manifest, _run_as(manifest)))
    return "\n".join(out) + "\n"


def _backup_paths(prefix: str, path: str) -> tuple[str, str]:
    """Where the committed copy of `path` is kept during a deploy, and its "was absent" marker
    (both quoted for the shell)."""
    backup = posixpath.join(prefix, STATE_DIR, "prev")
    rel = path.lstrip("/")
    return quote(f"{backup}/files/{rel}"), quote(f"{backup}/absent/{rel}")


def rollback_script(
    plan: HostPlan,
    manifest: Mapping[str, Any],
    links: Iterable[str],
    runtime_back: bool,
    *,
    finish: bool = False,
) -> str:
    """Restore the backed-up files of `links`, switch the runtime back, restart the old daemons.

    With `finish` (the whole host went back: nothing of this deploy stays), the backups and the
    pending marker are dropped too; otherwise the commit that follows drops them."""
    prefix = manifest["prefix"]
    state = posixpath.join(prefix, STATE_DIR)
    links = set(links)
    out = [_SH_FUNCS, _SH_LOCKED, _lock_sh(prefix)]
    if runtime_back:
        rt = quote(_rt(prefix))
        out.append(
            f'if [ -L {rt}/previous ]; then ln -sfn "$(readlink {rt}/previous)" {rt}/current.new'
            f" && mv -T {rt}/current.new {rt}/current && "
            f"basename \"$(readlink {rt}/current)\" | sed 's/^venv-//' > {rt}/STAMP; fi"
        )
    restart = sorted(links | (set(plan.restarts) if runtime_back else set()))
    reload = sorted(link for link in restart if link in plan.reload and link not in plan.restarts)
    restart = [link for link in restart if link not in reload]
    for link in restart:
        out.append(_stop_sh(link, manifest["links"][link], plan.use_systemd))
    paths = {path for link in links for path in plan.paths.get(link, [])}
    paths |= {item.path for item in plan.files if item.link in links}
    units = sorted(path for path in paths if path.startswith(UNIT_DIR + "/"))
    for unit_path in units if plan.use_systemd else []:  # a new unit goes: not enabled either
        _saved, absent = _backup_paths(prefix, unit_path)
        out.append(f"if [ -e {absent} ]; then systemctl disable --quiet "
                   f"{quote(posixpath.basename(unit_path))} 2>/dev/null || true; fi")  # fmt: skip
    for path in sorted(paths):
        saved, absent = _backup_paths(prefix, path)
        dst = quote(path)
        out.append(f"if [ -e {absent} ]; then rm -f {dst}; elif [ -f {saved} ]; then "
                   f"cp -p {saved} {dst}; fi")  # fmt: skip
    if plan.use_systemd and units:
        out.append("systemctl daemon-reload")
    for link in restart:
        entry = manifest["links"][link]
        conf = quote(entry["config"])
        out.append(f"if [ -f {conf} ]; then")
        start = _start_sh(link, entry, prefix, plan.use_systemd, _run_as(manifest))
        out.append("  " + start.strip())
        out.append("fi")
    for link in reload:  # a hub reloaded by this deploy: back to its previous peers directory
        out.append(_reload_sh(link, manifest["links"][link], plan.use_systemd))
    if finish:
        out.append(f"rm -rf {quote(state)}/prev {quote(state)}/pending")
    return "\n".join(out) + "\n"


def commit_script(manifest: Mapping[str, Any]) -> str:
    """Record the deployed manifest (stdin), then drop the commit-confirm backups and the
    pending marker -- in that order, so an interruption never loses the committed state."""
    state = posixpath.join(manifest["prefix"], STATE_DIR)
    return (
        _lock_sh(manifest["prefix"]) + f"umask 077; cat > {quote(state)}/manifest.json.new && "
        f"mv {quote(state)}/manifest.json.new {quote(state)}/manifest.json && "
        f"rm -rf {quote(state)}/prev {quote(state)}/pending\n"
    )


def status_command(manifest: Mapping[str, Any], link: str) -> str:
    """The remote command printing one link's status record as JSON (``vpnd status``)."""
    entry = manifest["links"][link]
    return quote(_runtime_bin(manifest["prefix"]), "status", "-f", entry["config"], "--json")


_MARK = "@@vpnctl"


def status_script(
    manifest: Mapping[str, Any], links: Iterable[str], *, wait_up: float = 0.0
) -> str:
    """One shell script reading the status records of `links` on a host, no Python started.

    It does what ``vpnd status`` does -- read the record the daemon publishes atomically and
    check that its process is alive (via the pidfile) -- for every link in one go, plus the host
    clock and each key file's mtime. Output per link: a marker line, ``config yes|no``,
    ``alive yes|no``, the record on one line (or ``-``), ``keymtime <s>|-``, ``pidfile <pid>|-``.

    With `wait_up` (seconds), it first waits on the host, checking every 0.2 s, until every
    link's record (hubs aside: their clients are in ``peers[]``) says ``"state": "up"``: a
    deploy confirming links that are still coming up then makes one ssh call per host instead
    of one every poll interval (each costs the host a login shell).
    """
    links = list(links)
    lines = [_SH_FUNCS]
    waited = [quote(manifest["links"][link]["statusfile"]) for link in links
              if manifest["links"][link].get("role") != "hub"]  # fmt: skip
    if wait_up > 0 and waited:
        rounds = max(1, math.ceil(wait_up / 0.2))
        lines.append(
            f"n=0; while [ $n -lt {rounds} ]; do w=0; for f in {' '.join(waited)}; do "
            'grep -q \'"state": "up"\' "$f" 2>/dev/null || { w=1; break; }; done; '
            "[ $w = 0 ] && break; sleep 0.2; n=$((n+1)); done"
        )
    lines.append("date +%s.%N")
    keys = [manifest["links"][link]["keyfile"] for link in links
            if manifest["links"][link].get("keyfile")]  # fmt: skip
    if keys:  # every key's mtime from one stat, each found by its name (absent: -)
        lines.append(f"km=$nl$(stat -c '%Y %n' -- {quote(*keys)} 2>/dev/null)$nl")
    for link in links:
        entry = manifest["links"][link]
        sf, pf = quote(entry["statusfile"]), quote(entry["pidfile"])
        key = quote(entry["keyfile"]) if entry.get("keyfile") else None
        lines += [
            f"echo {quote(f'{_MARK} {link}')}",
            f'if [ -f {quote(entry["config"])} ]; then echo "config yes"; '
            'else echo "config no"; fi',
            f'rdpid {pf}; if alive "$rp"; then echo "alive yes"; else echo "alive no"; fi',
            f"if [ -f {sf} ]; then tr -d '\\n' < {sf}; echo; else echo -; fi",
            f'k=${{km%%" "{key}"$nl"*}}; if [ "$k" != "$km" ]; then '
            'echo "keymtime ${k##*"$nl"}"; else echo "keymtime -"; fi'
            if key
            else 'echo "keymtime -"',  # a hub: one key per client, none of its own
            'echo "pidfile ${rp:--}"',
        ]
    return "\n".join(lines) + "\n"
