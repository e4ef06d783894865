"""The operator's keystore: one 256-bit shared key per link, plus the tunnel address record.

Layout of the keystore directory (mode 0700; every file 0600, created with O_EXCL)::

    <link>.key              the key, in the runtime's key-file format (64 hex digits + "\\n")
    <link>.key.enc          ... or the same key encrypted at rest (format below), never both
    <link>.meta.json        {"version", "link", "fingerprint", "created", "encrypted"}: the
                            creation time, and the fingerprint of an encrypted key (so `keys`
                            and `render` never need the passphrase); a plain key's fingerprint
                            is always computed from the key file itself
    <link>.next.key[.enc]   a staged replacement (`keygen --rotate LINK`) with its
    <link>.next.meta.json   metadata; the current key stays until `keygen --promote LINK`
    <link>.retired-<UTC>.*  keys replaced by a promotion (kept, never deleted by vpnctl)
    <link>.rotation.json    {"version", "link", "phase"}: how far `vpnctl rotate` got
                            (accept, switch, retire; see vpnctl/rotation.py); absent when no
                            rotation is under way. Rewritten atomically (like allocations.json)
    allocations.json        tunnel addresses handed out from the pool (see inventory.py)

The creation time in ``<link>.meta.json`` is the key's age (``vpnctl keys``, ``vpnctl rotate
--max-age``); a key without metadata (made by hand) falls back to its file's mtime.

Rules: an existing key is never overwritten or regenerated; keys never appear in messages,
listings or diffs (only fingerprints do).

Encrypted key file format (text, so that it is recognisable with ``head``)::

    vpnctl-encrypted-key 1
    kdf: scrypt n=131072 r=8 p=1 salt=<32 hex digits>
    aead: chacha20-poly1305 nonce=<24 hex digits>
    link: <link name>
    data: <hex of the 32-byte key sealed with its 16-byte tag>

The AEAD key is scrypt(passphrase, salt); every header line before ``data:`` is the associated
data, so changing a parameter or renaming the file to another link makes decryption fail.
New files use n=2^17 (OWASP's current minimum; ~128 MiB, a third of a second); files written with
the earlier n=2^15 still open.  The header is read before any scrypt runs, and a header asking for
more than 256 MiB of memory (128*n*r) or 8 times the default work (n*r*p) is refused, naming the
file: a crafted file cannot make vpnctl allocate gigabytes or spin for minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vpnctl.inventory import UserError
from vpnctl.pool6 import Record6
from vpnd_runtime.keyfile import KEY_BYTES, KeyFileError, fingerprint, load_key, write_exclusive

__all__ = [
    "ENCRYPTED_MAGIC",
    "KeyInfo",
    "Keystore",
    "KeystoreError",
    "format_age",
]

ENCRYPTED_MAGIC = "vpnctl-encrypted-key 1"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
#: The most a file header may ask of scrypt: memory 128*n*r bytes, and work n*r*p.
SCRYPT_MAX_MEMORY = 256 * 2**20
SCRYPT_MAX_WORK = 8 * SCRYPT_N * SCRYPT_R * SCRYPT_P
_SALT_BYTES, _NONCE_BYTES = 16, 12
_HEADER_RE = re.compile(
    r"vpnctl-encrypted-key 1\n"
    r"kdf: scrypt n=(?P<n>[0-9]+) r=(?P<r>[0-9]+) p=(?P<p>[0-9]+) salt=(?P<salt>[0-9a-f]{32})\n"
    r"aead: chacha20-poly1305 nonce=(?P<nonce>[0-9a-f]{24})\n"
    r"link: (?P<link>\S+)\n"
)
_DATA_RE = re.compile(r"data: (?P<data>[0-9a-f]{96})\n")
ALLOCATIONS = "allocations.json"


class KeystoreError(UserError):
    """A keystore problem the operator can fix; the message names the file."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the key itself."""

    link: str
    fingerprint: str
    created: float  # Unix time
    encrypted: bool
    path: Path
    #: Where ``created`` comes from: "metadata" (recorded when vpnctl made the key) or "mtime"
    #: (a key without metadata, e.g. copied in by hand: its file's modification time).
    created_from: str = "metadata"


def format_age(seconds: float) -> str:
    """A short human age: ``45s``, ``12m``, ``5h 3m``, ``9d 4h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _write_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` with O_EXCL, mode 0600, and write ``data`` (removed again on failure)."""
    try:
        write_exclusive(path, data)
    except FileExistsError:
        raise KeystoreError(f"{path}: already exists; vpnctl never overwrites a key") from None
    except OSError as exc:
        raise KeystoreError(f"{path}: cannot create or write: {exc.strerror}") from None


def _utc_text(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_utc(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _aead_key(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _check_scrypt_cost(n: int, r: int, p: int, where: str) -> None:
    """Refuse scrypt parameters that are malformed or cost more than the cap (before deriving)."""
    if not (n >= 2**10 and n & (n - 1) == 0 and r >= 1 and p >= 1):
        raise KeystoreError(f"{where}: unsupported scrypt parameters n={n} r={r} p={p}")
    memory = 128 * n * r
    if memory > SCRYPT_MAX_MEMORY or n * r * p > SCRYPT_MAX_WORK:
        raise KeystoreError(
            f"{where}: scrypt parameters n={n} r={r} p={p} ask for {memory // 2**20} MiB and "
            f"{n * r * p // (SCRYPT_N * SCRYPT_R * SCRYPT_P)}x the default work; vpnctl allows at "
            f"most {SCRYPT_MAX_MEMORY // 2**20} MiB and "
            f"{SCRYPT_MAX_WORK // (SCRYPT_N * SCRYPT_R * SCRYPT_P)}x (not a file vpnctl wrote?)"
        )


def encrypt_key(key: bytes, link: str, passphrase: bytes) -> bytes:
    """The encrypted key file bytes for ``key`` of ``link`` (format in the module docstring)."""
    salt, nonce = os.urandom(_SALT_BYTES), os.urandom(_NONCE_BYTES)
    header = (
        f"{ENCRYPTED_MAGIC}\n"
        f"kdf: scrypt n={SCRYPT_N} r={SCRYPT_R} p={SCRYPT_P} salt={salt.hex()}\n"
        f"aead: chacha20-poly1305 nonce={nonce.hex()}\n"
        f"link: {link}\n"
    ).encode()
    sealed = ChaCha20Poly1305(_aead_key(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)).encrypt(
        nonce, key, header
    )
    return header + f"data: {sealed.hex()}\n".encode()


def decrypt_key(data: bytes, link: str, passphrase: bytes, where: str) -> bytes:
    """The 32-byte key inside encrypted key file ``data``; ``where`` names it in errors."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeystoreError(f"{where}: not an encrypted key file") from None
    head = _HEADER_RE.match(text)
    tail = _DATA_RE.fullmatch(text, head.end()) if head else None
    if head is None or tail is None:
        raise KeystoreError(f"{where}: not an encrypted key file ({ENCRYPTED_MAGIC!r} format)")
    if head["link"] != link:
        raise KeystoreError(f"{where}: holds the key of link {head['link']!r}, not {link!r}")
    n, r, p = int(head["n"]), int(head["r"]), int(head["p"])
    _check_scrypt_cost(n, r, p, where)
    aead = ChaCha20Poly1305(_aead_key(passphrase, bytes.fromhex(head["salt"]), n, r, p))
    try:
        return aead.decrypt(
            bytes.fromhex(head["nonce"]), bytes.fromhex(tail["data"]), head.group(0).encode()
        )
    except InvalidTag:
        raise KeystoreError(f"{where}: wrong passphrase (or the file was altered)") from None


class Keystore:
    """The keystore directory ``root`` (see the module docstring for its layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ---- directory --------------------------------------------------------------------------
    def create(self) -> None:
        """Create the directory (mode 0700) if needed; refuse one that others can read."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeystoreError(f"{self.root}: cannot create keystore: {exc.strerror}") from None
        self.check_directory()

    def check_directory(self) -> None:
        """Raise unless the keystore exists, is a directory and is private (no group/other)."""
        try:
            info = self.root.stat()
        except FileNotFoundError:
            raise KeystoreError(
                f"{self.root}: no keystore here; run `vpnctl keygen` first"
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise KeystoreError(f"{self.root}: not a directory")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeystoreError(
                f"{self.root}: keystore mode {mode:04o} lets others in; run chmod 700 {self.root}"
            )

    # ---- paths ------------------------------------------------------------------------------
    def _stem(self, link: str, staged: bool = False) -> str:
        return f"{link}.next" if staged else link

    def key_path(self, link: str, *, staged: bool = False) -> Path:
        """Path of the key file of ``link`` as stored (``.key`` or ``.key.enc``)."""
        plain = self.root / f"{self._stem(link, staged)}.key"
        encrypted = self.root / f"{self._stem(link, staged)}.key.enc"
        return encrypted if encrypted.exists() and not plain.exists() else plain

    def meta_path(self, link: str, *, staged: bool = False) -> Path:
        """Path of the metadata (fingerprint, creation time) of the key of ``link``."""
        return self.root / f"{self._stem(link, staged)}.meta.json"

    def has_key(self, link: str, *, staged: bool = False) -> bool:
        """True when ``link`` has a (current or staged) key in the store."""
        stem = self._stem(link, staged)
        return any((self.root / f"{stem}{ext}").exists() for ext in (".key", ".key.enc"))

    # ---- keys -------------------------------------------------------------------------------
    def generate(
        self, link: str, *, passphrase: bytes | None = None, staged: bool = False
    ) -> KeyInfo:
        """Create a fresh random key for ``link`` (the staged one with ``staged``).

        Never replaces a key: raises KeystoreError when one exists. With ``passphrase`` the
        key is stored encrypted (scrypt + ChaCha20-Poly1305).
        """
        self.create()
        if self.has_key(link, staged=staged):
            which = "a staged key" if staged else "a key"
            raise KeystoreError(
                f"{self.key_path(link, staged=staged)}: {link!r} already has "
                f"{which}; vpnctl never overwrites a key"
            )
        key = os.urandom(KEY_BYTES)
        stem = self._stem(link, staged)
        if passphrase is None:
            path = self.root / f"{stem}.key"
            _write_exclusive(path, (key.hex() + "\n").encode("ascii"))
        else:
            path = self.root / f"{stem}.key.enc"
            _write_exclusive(path, encrypt_key(key, link, passphrase))
        created = time.time()
        meta = {
            "version": 1,
            "link": link,
            "fingerprint": fingerprint(key),
            "created": _utc_text(created),
            "encrypted": passphrase is not None,
        }
        _write_exclusive(self.meta_path(link, staged=staged), _json_bytes(meta))
        return self.info(link, staged=staged) or _impossible(link)

    def info(self, link: str, *, staged: bool = False) -> KeyInfo | None:
        """Fingerprint, creation time and encryption of the key of ``link`` (None: no key).

        The fingerprint of a plain key is computed from the key file itself, never taken from
        the metadata, so a damaged or swapped key shows (or fails) as it is: a malformed key
        file or one others can read is a KeystoreError naming the file. An encrypted key file
        is checked for its format, link and mode; its fingerprint is the metadata's (it cannot
        be known without the passphrase; :meth:`load` proves the two agree)."""
        if not self.has_key(link, staged=staged):
            return None
        path = self.key_path(link, staged=staged)
        meta_path = self.meta_path(link, staged=staged)
        meta: dict[str, object] | None = None
        try:
            loaded = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise TypeError("not a JSON object")
            meta = loaded
            created = _parse_utc(str(meta["created"]))
        except FileNotFoundError:
            created = None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeystoreError(f"{meta_path}: unreadable key metadata: {exc}") from None
        if path.suffix == ".enc":
            self.check_encrypted_file(path, link)
            if meta is None:
                raise KeystoreError(
                    f"{meta_path}: missing; the fingerprint of an encrypted key is "
                    "only known from its metadata"
                )
            try:
                recorded = str(meta["fingerprint"])
            except KeyError as exc:
                raise KeystoreError(f"{meta_path}: unreadable key metadata: {exc}") from None
            return KeyInfo(link, recorded, created or path.stat().st_mtime, True, path,
                           "metadata" if created else "mtime")  # fmt: skip
        key = self._load_plain(path)
        return KeyInfo(link, fingerprint(key), created or path.stat().st_mtime, False, path,
                       "metadata" if created else "mtime")  # fmt: skip

    def check_encrypted_file(self, path: Path, link: str) -> None:
        """Refuse an encrypted key file others can read, or one not in the encrypted format
        for ``link`` (checked without the passphrase); the KeystoreError names the file."""
        self._check_private(path)
        try:
            text = path.read_bytes()[:4096].decode("ascii")
        except (OSError, UnicodeDecodeError):
            text = ""
        head = _HEADER_RE.match(text)
        if head is None or _DATA_RE.fullmatch(text, head.end()) is None:
            raise KeystoreError(
                f"{path}: malformed encrypted key file (not the {ENCRYPTED_MAGIC!r} format)"
            )
        if head["link"] != link:
            raise KeystoreError(f"{path}: holds the key of link {head['link']!r}, not {link!r}")

    def _load_plain(self, path: Path) -> bytes:
        try:
            return load_key(path)
        except KeyFileError as exc:
            raise KeystoreError(str(exc)) from None

    def load(self, link: str, *, passphrase: bytes | None = None, staged: bool = False) -> bytes:
        """The 32-byte key of ``link``; encrypted keys need ``passphrase``."""
        path = self.key_path(link, staged=staged)
        if not path.exists():
            raise KeystoreError(f"{path}: no key for link {link!r}; run `vpnctl keygen`")
        if path.suffix != ".enc":
            return self._load_plain(path)
        if passphrase is None:
            raise KeystoreError(
                f"{path}: the key is encrypted; give a passphrase "
                "(--passphrase-env VAR, --passphrase-file FILE or the prompt)"
            )
        self._check_private(path)
        key = decrypt_key(path.read_bytes(), link, passphrase, str(path))
        info = self.info(link, staged=staged)
        if info is not None and info.fingerprint != fingerprint(key):
            raise KeystoreError(
                f"{self.meta_path(link, staged=staged)}: fingerprint does not match the key"
            )
        return key

    def key_file_bytes(self, link: str, *, passphrase: bytes | None = None) -> bytes:
        """The runtime key file (64 hex + newline) of ``link``, e.g. for ``deploy`` to install."""
        return (self.load(link, passphrase=passphrase).hex() + "\n").encode("ascii")

    def is_encrypted(self, link: str) -> bool:
        """True when the current key of ``link`` is stored encrypted."""
        return self.key_path(link).suffix == ".enc"

    def _check_private(self, path: Path) -> None:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeystoreError(
                f"{path}: mode {mode:04o} lets others read it; run chmod 600 {path}"
            )

    def promote(self, link: str) -> KeyInfo:
        """Make the staged key of ``link`` current; the old one is kept as ``retired-<UTC>``."""
        if not self.has_key(link, staged=True):
            raise KeystoreError(
                f"{self.root}: {link!r} has no staged key; "
                f"run `vpnctl keygen --rotate {link}` first"
            )
        old = self.info(link)
        if old is not None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            retired = f"{link}.retired-{stamp}"
            for path in (self.key_path(link), self.meta_path(link)):
                if path.exists():
                    target = self.root / path.name.replace(link, retired, 1)
                    if target.exists():
                        raise KeystoreError(f"{target}: already exists; try again in a second")
                    os.link(path, target)
                    path.unlink()
        for path in (self.key_path(link, staged=True), self.meta_path(link, staged=True)):
            if path.exists():
                os.link(path, self.root / path.name.replace(f"{link}.next", link, 1))
                path.unlink()
        return self.info(link) or _impossible(link)

    # ---- rotation state ---------------------------------------------------------------------
    def rotation_path(self, link: str) -> Path:
        """``<keystore>/<link>.rotation.json``: the phase `vpnctl rotate` reached."""
        return self.root / f"{link}.rotation.json"

    def rotation_phase(self, link: str) -> str | None:
        """The recorded rotation phase of ``link`` (None: no rotation under way)."""
        path = self.rotation_path(link)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            phase = data["phase"]
            if not isinstance(phase, str) or data.get("link") != link:
                raise TypeError(f"not a rotation record of {link!r}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeystoreError(f"{path}: unreadable rotation record: {exc}") from None
        return phase

    def set_rotation_phase(self, link: str, phase: str | None) -> None:
        """Record (atomically) that ``link``'s rotation reached ``phase``; None removes it."""
        path = self.rotation_path(link)
        if phase is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        self.create()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _write_exclusive(tmp, _json_bytes({"version": 1, "link": link, "phase": phase}))
        tmp.replace(path)

    def rotations(self, links: list[str]) -> dict[str, tuple[str, str | None]]:
        """Link -> (phase, fingerprint of the staged key) for every link of ``links`` whose
        rotation is under way (``retire`` has no staged key left: the new key is current)."""
        out: dict[str, tuple[str, str | None]] = {}
        for link in links:
            phase = self.rotation_phase(link)
            if phase is None:
                continue
            staged = self.info(link, staged=True)
            out[link] = (phase, staged.fingerprint if staged else None)
        return out

    # ---- tunnel address record --------------------------------------------------------------
    @property
    def allocations_path(self) -> Path:
        """``<keystore>/allocations.json``."""
        return self.root / ALLOCATIONS

    def load_allocations(self) -> dict[str, tuple[IPv4Address, IPv4Address]]:
        """Link name -> (server, client) tunnel addresses allocated earlier ({} when none)."""
        path = self.allocations_path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {
                str(name): (IPv4Address(pair["server"]), IPv4Address(pair["client"]))
                for name, pair in data["links"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeystoreError(f"{path}: unreadable allocation record: {exc}") from None

    def load_allocations6(self) -> Record6:
        """The IPv6 pool and pairs allocated earlier (``"ipv6"`` in allocations.json)."""
        path = self.allocations_path
        try:
            data = json.loads(path.read_text(encoding="utf-8")).get("ipv6")
            if data is None:
                return Record6()
            return Record6(
                IPv6Network(data["pool"]),
                {
                    str(name): (IPv6Address(pair["server"]), IPv6Address(pair["client"]))
                    for name, pair in data["links"].items()
                },
                {
                    str(name): (
                        IPv6Network(hub["network"]),
                        {str(c): IPv6Address(a) for c, a in hub["clients"].items()},
                    )
                    for name, hub in data.get("hubs", {}).items()
                },
            )
        except FileNotFoundError:
            return Record6()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeystoreError(f"{path}: unreadable allocation record: {exc}") from None

    def save_allocations6(self, record: Record6) -> bool:
        """Write the IPv6 part of the allocation record (the rest kept); True when written."""
        body = self._allocation_body()
        if record.pool is not None:
            body["ipv6"] = {
                "pool": str(record.pool),
                "links": {
                    name: {"server": str(pair[0]), "client": str(pair[1])}
                    for name, pair in sorted(record.links.items())
                },
            }
            if record.hubs:
                body["ipv6"]["hubs"] = {  # type: ignore[index]
                    name: {
                        "network": str(network),
                        "clients": {c: str(a) for c, a in sorted(clients.items())},
                    }
                    for name, (network, clients) in sorted(record.hubs.items())
                }
        body.setdefault("version", 1)
        body.setdefault("links", {})
        return self._write_allocations(_json_bytes(body))

    def _allocation_body(self) -> dict[str, object]:
        try:
            body = json.loads(self.allocations_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    def load_hub_allocations(self) -> dict[str, tuple[IPv4Network, dict[str, IPv4Address]]]:
        """Hub name -> (its network, {client: tunnel address}) allocated earlier ({} when none).

        Stored under ``"hubs"`` in ``allocations.json``, beside the links' pairs."""
        path = self.allocations_path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return {
                str(name): (
                    IPv4Network(hub["network"]),
                    {str(c): IPv4Address(a) for c, a in hub["clients"].items()},
                )
                for name, hub in data.get("hubs", {}).items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise KeystoreError(f"{path}: unreadable allocation record: {exc}") from None

    def save_allocations(
        self,
        record: Mapping[str, tuple[IPv4Address, IPv4Address]],
        hubs: Mapping[str, tuple[IPv4Network, Mapping[str, IPv4Address]]] | None = None,
    ) -> bool:
        """Write the allocation record atomically when it changed; True when it was written.

        ``hubs`` (hub -> network and client addresses) is written under ``"hubs"`` only when
        there is one, so a record without hubs keeps its bytes."""
        body: dict[str, object] = {
            "version": 1,
            "links": {
                name: {"server": str(pair[0]), "client": str(pair[1])}
                for name, pair in sorted(record.items())
            },
        }
        if hubs:
            body["hubs"] = {
                name: {
                    "network": str(network),
                    "clients": {c: str(a) for c, a in sorted(clients.items())},
                }
                for name, (network, clients) in sorted(hubs.items())
            }
        if "ipv6" in (earlier := self._allocation_body()):
            body["ipv6"] = earlier["ipv6"]  # the IPv6 pairs are saved by save_allocations6
        return self._write_allocations(_json_bytes(body))

    def _write_allocations(self, data: bytes) -> bool:
        path = self.allocations_path
        with contextlib.suppress(FileNotFoundError):
            if path.read_bytes() == data:
                return False
        self.create()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _write_exclusive(tmp, data)
        tmp.replace(path)
        return True


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _impossible(link: str) -> KeyInfo:
    raise KeystoreError(f"key of {link!r} vanished while it was being written")
