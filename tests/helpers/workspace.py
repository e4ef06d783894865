"""A minimal vpnctl workspace (inventory + empty keystore) for CLI tests that need no hosts."""

from __future__ import annotations

from pathlib import Path

from vpnctl.keystore import Keystore

TWO_HOSTS = """version: 1
hosts:
  - name: alpha
    address: 198.18.1.1
  - name: beta
    address: 198.18.1.2
links:
  - name: ab
    server: alpha
    client: beta
"""


def workspace(directory: Path, inventory: str = TWO_HOSTS) -> list[str]:
    """Write the inventory, create the keystore in `directory`; return vpnctl's global options."""
    (directory / "inventory.yaml").write_text(inventory)
    Keystore(directory / "keystore").create()
    return ["-i", str(directory / "inventory.yaml"), "--keystore", str(directory / "keystore"),
            "--build", str(directory / "build")]  # fmt: skip
