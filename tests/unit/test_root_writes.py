"""Files root writes or reads as a trust anchor: planted symlinks and stand-in devices are refused.

A pidfile or status file lives in a directory others may be able to write (an operator's
``pidfile /var/tmp/``, a shared /run). A symlink planted there must never make the daemon
overwrite the file it points at; and a regular file named as ``randomdev`` would hand the
handshake predictable "random" bytes, so it is refused, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vpnd_runtime.carriers import RandomDev
from vpnd_runtime.process import write_pidfile
from vpnd_runtime.status import StatusRecord, StatusWriter


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    return victim


def test_a_pidfile_planted_as_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path):
    victim = _victim(tmp_path)
    pidfile = tmp_path / "vpnd.pid"
    pidfile.symlink_to(victim)
    with pytest.raises(OSError):
        write_pidfile(str(pidfile))
    assert victim.read_text() == "precious\n"


def test_the_status_temp_file_never_follows_a_planted_symlink(tmp_path: Path):
    victim = _victim(tmp_path)
    writer = StatusWriter(str(tmp_path / "vpnd.status.json"))
    Path(writer._tmp).symlink_to(victim)  # planted at the name the writer will use
    writer.write(StatusRecord("c", "server", "t0", "198.19.0.1", "198.19.0.2", "fp"))
    assert victim.read_text() == "precious\n"
    assert '"state": "starting"' in (tmp_path / "vpnd.status.json").read_text()
    assert not Path(writer._tmp).is_symlink()


def test_the_status_file_itself_planted_as_a_symlink_is_replaced_not_followed(tmp_path: Path):
    victim = _victim(tmp_path)
    status = tmp_path / "vpnd.status.json"
    status.symlink_to(victim)
    StatusWriter(str(status)).write(StatusRecord("c", "server", "t0", "1", "2", "fp"))
    assert victim.read_text() == "precious\n"
    assert not status.is_symlink()


def test_randomdev_that_is_a_regular_file_is_refused_by_the_daemon_naming_it(tmp_path: Path):
    fake = tmp_path / "not-random"
    fake.write_bytes(b"\0" * 64)
    with pytest.raises(OSError, match=f"{fake}.*not a character device"):
        RandomDev(str(fake))


def test_randomdev_character_device_is_accepted(tmp_path: Path):
    rng = RandomDev("/dev/urandom")
    try:
        assert len(rng(32)) == 32
    finally:
        rng.close()
