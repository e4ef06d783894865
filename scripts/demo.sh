#!/usr/bin/env bash
# vpnctl demo: a lab of namespaced hosts -> keygen -> render -> deploy -> status -> ping through
# every tunnel -> lab down. The lab's server is one hub (one vpnd, one port) for all clients
# (HUB=0 for one point-to-point link per client instead). Needs root (network namespaces). Installs what it needs on a fresh
# Debian/Ubuntu machine. Everything it creates is torn down on exit, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CLIENTS=${CLIENTS:-3}
HUB=${HUB:-1}
TAG=${TAG:-vdemo}

if [ -t 1 ]; then B=$'\033[1m' N=$'\033[0m'; else B='' N=''; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
run()  { printf '$ %s\n' "$*"; "$@"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: needs root for network namespaces (try: sudo make demo)" >&2
    exit 2
fi

step "Checking tools (iproute2, OpenSSH client and server, ping)"
missing=()
for tool in ip sshd ssh ssh-keygen ping; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null; then
        echo "installing packages for: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends iproute2 iputils-ping \
            openssh-server openssh-client >/dev/null
    else
        echo "demo: missing ${missing[*]} and no apt-get to install them" >&2
        exit 2
    fi
fi
if [ ! -x "$ROOT/.venv/bin/vpnctl" ]; then
    step "Creating the virtualenv (.venv) with vpnctl and vpnd"
    make -s venv
fi
VPNCTL=$ROOT/.venv/bin/vpnctl
PY=$ROOT/.venv/bin/python

LAB=$(mktemp -d "/tmp/${TAG}-XXXXXX")
lab_is_up=0
cleanup() {
    status=$?
    if [ "$lab_is_up" = 1 ]; then
        step "Tearing the lab down (namespaces, links, sshd and vpnd processes, files)"
        "$VPNCTL" lab down --dir "$LAB" || true
    fi
    rmdir "$LAB" 2>/dev/null || true
    if [ $status -ne 0 ]; then
        printf '\n%sdemo FAILED (exit %s)%s\n' "$B" "$status" "$N" >&2
    fi
}
trap cleanup EXIT

if [ "$HUB" = 1 ]; then SHAPE=--hub; else SHAPE=--links; fi
step "1. Lab up: one server and $CLIENTS clients, each a namespace with its own sshd ($SHAPE)"
lab_is_up=1
run "$VPNCTL" lab up --dir "$LAB" --tag "$TAG" --clients "$CLIENTS" "$SHAPE"
cd "$LAB"
echo "(the lab wrote $LAB/inventory.yaml and $LAB/ssh_config; try: ssh -F $LAB/ssh_config server)"
LATE=""
if [ "$HUB" = 1 ] && [ "$CLIENTS" -gt 1 ]; then
    LATE=client$CLIENTS  # joins the hub later (step 7): the hub reloads, nobody else restarts
    sed -i "/^  - $LATE\$/d" inventory.yaml
    echo "(client$CLIENTS is left out of the hub for now: it joins in step 7)"
fi

step "2. Keygen: one 256-bit key per link or hub client, in keystore/ (0600; only fingerprints)"
run "$VPNCTL" keygen

step "3. Render: paired configs into build/<host>/, then prove each pair mirrors"
run "$VPNCTL" render
run "$VPNCTL" render --check

step "4. Deploy to every host over ssh: runtime wheelhouse, configs, keys; confirm both ends"
run "$VPNCTL" deploy --all

step "5. Status: every link from both ends"
run "$VPNCTL" status

step "6. Ping through every tunnel: each client -> its server or hub, the hub -> each client, and client -> client through the hub"
"$PY" - "$LAB" "$TAG" <<'PYEOF'
import json, pathlib, subprocess, sys
lab, tag = pathlib.Path(sys.argv[1]), sys.argv[2]
failed = 0

def ping(host, far, why):
    global failed
    argv = ["ip", "netns", "exec", f"{tag}-{host}", "ping", "-c", "3", "-i", "0.2", "-W", "3",
            far]
    print(f"$ {' '.join(argv)}   # {why}", flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True)
    summary = [l for l in proc.stdout.splitlines() if "packet loss" in l or "rtt" in l]
    print("  " + "\n  ".join(summary or [proc.stderr.strip()]))
    failed += proc.returncode != 0

for manifest in sorted((lab / "build").glob("*/manifest.json")):
    m = json.loads(manifest.read_text())
    for link, entry in sorted(m["links"].items()):
        if entry["role"] == "hub":
            for name, client in sorted(entry["clients"].items()):
                ping(m["host"], client["address"], f"{m['host']} (hub {link}) -> {name}")
            names = sorted(entry["clients"])
            if entry.get("clienttoclient", True) and len(names) > 1:
                for a, b in zip(names, names[1:] + names[:1]):
                    ping(entry["clients"][a]["host"], entry["clients"][b]["address"],
                         f"client to client through the hub: {a} -> {b}")
        if entry["role"] != "client":
            continue
        peer = json.loads((lab / "build" / entry["peer"] / "manifest.json").read_text())
        far = peer["links"][link]["local"]
        ping(m["host"], far, f"{link}: {m['host']} -> {entry['peer']}")
sys.exit(1 if failed else 0)
PYEOF

if [ -n "$LATE" ]; then
    step "7. $LATE joins the hub: a new key and peer file; the hub is reloaded (SIGHUP), not restarted"
    echo "  - $LATE" >> inventory.yaml
    HUBPID=$(cat "$LAB/hosts/server/root/run/vpnd/hub.pid")
    run "$VPNCTL" keygen
    run "$VPNCTL" render
    run "$VPNCTL" deploy --all
    run "$VPNCTL" status
    echo "hub PID before $HUBPID, after $(cat "$LAB/hosts/server/root/run/vpnd/hub.pid")"
fi

step "8. Deploy again: nothing changed, so nothing is restarted"
run "$VPNCTL" deploy --all

cd "$ROOT"
step "9. Lab down"
lab_is_up=0
run "$VPNCTL" lab down --dir "$LAB"
rmdir "$LAB" 2>/dev/null || true
printf '\n%sdemo OK%s\n' "$B" "$N"
