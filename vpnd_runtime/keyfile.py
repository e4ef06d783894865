"""The link's shared key file: generate once, load with strict checks, show a fingerprint.

File format: exactly one line of 64 lowercase hexadecimal characters (the 32-byte key) followed
by ``"\\n"``. :func:`load_key` also accepts uppercase hex, a missing final newline or a CRLF, and
nothing else.

Rules (DESIGN.md §3): 256-bit random keys, mode 0600, never overwritten, refused when anyone but
the owner can read them, never logged or printed. No message or exception raised here contains
key material: only paths, modes and lengths.
"""

from __future__ import annotations

import os
import pwd
import stat

try:  # hashlib's own blake2s, without importing hashlib, whose _hashlib maps the system
    # libcrypto (~3.5 MB of RSS in the daemon, which already has cryptography's OpenSSL)
    from _blake2 import blake2s
except ImportError:  # pragma: no cover - a Python built without _blake2
    from hashlib import blake2s

__all__ = ["KEY_BYTES", "KeyFileError", "fingerprint", "generate_key", "load_key", "user_uid"]

KEY_BYTES = 32
_HEX_CHARS = 2 * KEY_BYTES
_MAX_FILE = 4096  # anything larger is certainly not a key file; never read it all
_HEX = frozenset("0123456789abcdefABCDEF")


class KeyFileError(ValueError):
    """A key file could not be created or used; ``path`` names the file."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


def _read_random(randomdev: str, count: int) -> bytes:
    """Read exactly ``count`` bytes from ``randomdev`` (looping over short reads)."""
    try:
        fd = os.open(randomdev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(randomdev, f"cannot open random source: {exc.strerror}") from None
    chunks: list[bytes] = []
    got = 0
    try:
        while got < count:
            chunk = os.read(fd, count - got)
            if not chunk:
                raise KeyFileError(randomdev, f"random source gave only {got} of {count} bytes")
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise KeyFileError(randomdev, f"cannot read random source: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


class _WriteFailed(OSError):
    """The file was created but writing it failed (it has been removed again)."""


def write_exclusive(path: str | os.PathLike[str], data: bytes) -> None:
    """Create `path` with O_EXCL|O_NOFOLLOW and mode 0600 and write `data`, synced.

    The one way secrets reach the disk (vpnd key files, vpnctl's keystore): an existing file, even
    a dangling symlink, is never replaced (FileExistsError), and a partly written file is removed
    (raised as an OSError subclass after the file is gone).
    """
    name = os.fspath(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only clear bits; make the mode exact anyway
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        os.unlink(name)
        raise _WriteFailed(exc.errno, exc.strerror) from exc
    os.close(fd)


def generate_key(path: str | os.PathLike[str], randomdev: str = "/dev/random") -> bytes:
    """Create a new key file at ``path`` from 32 bytes of ``randomdev`` and return the key.

    The file is created with ``O_EXCL`` and mode 0600, so an existing key is never replaced
    (an existing file, even a dangling symlink, is refused). A partly written file is removed.
    """
    name = os.fspath(path)
    key = _read_random(randomdev, KEY_BYTES)
    try:
        write_exclusive(name, (key.hex() + "\n").encode("ascii"))
    except FileExistsError:
        raise KeyFileError(name, "refusing to overwrite an existing key file") from None
    except _WriteFailed as exc:
        raise KeyFileError(name, f"cannot write key file: {exc.strerror}") from None
    except OSError as exc:
        raise KeyFileError(name, f"cannot create key file: {exc.strerror}") from None
    return key


def load_key(path: str | os.PathLike[str], owner: int | None = None) -> bytes:
    """Return the 32-byte key stored at ``path``.

    Refused: not a regular file, any group/other permission bit set, owned by someone other
    than the current user, root or ``owner`` (the account a daemon started as root drops to:
    it must read its keys again on SIGHUP, after the drop), or content that is not exactly one
    64-hex-digit line.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise KeyFileError(name, f"cannot open key file: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(name, "key file is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                name,
                f"key file mode {mode:04o} lets others read it; run chmod 600 {name}",
            )
        if info.st_uid not in (os.geteuid(), 0, owner):
            raise KeyFileError(
                name,
                f"key file is owned by uid {info.st_uid}, not by this user"
                + (f", the daemon's user (uid {owner})" if owner is not None else "")
                + " or root",
            )
        data = os.read(fd, _MAX_FILE + 1)
    except OSError as exc:
        raise KeyFileError(name, f"cannot read key file: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _decode(name, data)


def _decode(name: str, data: bytes) -> bytes:
    """Parse key file bytes; messages describe the shape, never the content."""
    expected = f"expected one line of {_HEX_CHARS} hex digits (a {KEY_BYTES}-byte key)"
    if len(data) > _MAX_FILE:
        raise KeyFileError(name, f"malformed key file: too large; {expected}")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(name, f"malformed key file: not text; {expected}") from None
    if not set(text) <= _HEX:
        raise KeyFileError(name, f"malformed key file: non-hex characters; {expected}")
    if len(text) != _HEX_CHARS:
        raise KeyFileError(name, f"malformed key file: {len(text)} hex digits; {expected}")
    return bytes.fromhex(text)


def fingerprint(key: bytes) -> str:
    """A short, stable, non-secret identifier of ``key``: ``ab12:cd34:ef56:7890``.

    The first 8 bytes of BLAKE2s(key, person=b"vpndfp"), as four groups of four hex digits.
    Both ends of a link show the same fingerprint when they hold the same key.
    """
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes")
    digest = blake2s(bytes(key), person=b"vpndfp").hexdigest()[:16]
    return ":".join(digest[i : i + 4] for i in range(0, 16, 4))


def user_uid(user: str | None) -> int | None:
    """The uid of a config's `user` account, whose key files `load_key` accepts (a daemon that
    dropped to it reads its keys again on SIGHUP), or None; privdrop.py names an unknown user."""
    if user is None:
        return None
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None
