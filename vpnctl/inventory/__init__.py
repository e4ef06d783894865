"""The operator's inventory (``inventory.yaml``): hosts, links, defaults -> a validated model.

Theory of operation
-------------------
The YAML text is *composed* (``yaml.compose``) rather than loaded, so every node keeps its
start mark and every problem can be reported as ``file:line path: message``, for example
``inventory.yaml:41 links[2].tunnel.client: 198.19.0.1 is already used by links[0]``.

Loading runs in stages, each collecting every problem it finds before giving up:

1. **Shape.** A small hand-written reader walks the node tree: unknown keys (with a difflib
   hint), wrong types, out-of-range values and duplicate YAML keys. Values resolve as
   link setting > ``defaults`` > built-in default; host settings (ssh, prefix, systemd) as
   host > ``defaults`` > built-in default.
2. **Cross checks.** Duplicate names and underlay addresses, links naming missing hosts,
   two TCP links on one server port (or two serial links on one device), colliding explicit
   tunnel addresses, overlapping routes on a host, routes that would swallow the carrier,
   interface names that clash on a host.
3. **Pool allocation** (:func:`allocate_tunnels`, called by the commands with the keystore's
   record). Links without ``tunnel:`` get a /30 block of ``defaults.tunnel_pool``: server
   = block + 1, client = block + 2. The home block is SHA-256(link name) modulo the number
   of blocks, probing upwards past blocks that hold a used address or overlap a route.
   Allocations are recorded in ``keystore/allocations.json`` and reused on every later run,
   so adding a link never moves another link's addresses, and the same inventory with the
   same record always yields the same addresses.

**Hubs** (``hubs:``): one server host for many client hosts (HUB-SPEC: one daemon, one port,
one peers directory). Each hub is checked like a link (host names, port, interface, routes on
every host that installs them) plus: a client listed twice, a client that is the hub's own
server, two clients with one address, overlapping routes behind two clients. Allocation
(:func:`allocate_hubs`, after the links) gives a hub without ``network:`` a /24 of the pool (home
block SHA-256(hub name), probing past used blocks; links' /30s avoid recorded hub networks) and
each client the next free address; both are recorded under ``"hubs"`` in ``allocations.json``.

Every accepted scalar records its line under its dotted path in ``Inventory.lines``; later
stages (allocation, rendering) use :meth:`Inventory.problem` to point at the right line.
"""

from vpnctl.inventory.allocate import allocate_hubs, allocate_tunnels, hub_networks
from vpnctl.inventory.model import (
    DEFAULT_POOL,
    HOOKS,
    ROLES,
    Host,
    Hub,
    HubClient,
    Inventory,
    InventoryError,
    Link,
    Problem,
    Side,
    Ssh,
    Tunables,
    UserError,
    hub_key_name,
)
from vpnctl.inventory.reader import load_inventory, parse_inventory

__all__ = [
    "DEFAULT_POOL",
    "HOOKS",
    "ROLES",
    "Host",
    "Hub",
    "HubClient",
    "Inventory",
    "InventoryError",
    "Link",
    "Problem",
    "Side",
    "Ssh",
    "Tunables",
    "UserError",
    "allocate_hubs",
    "allocate_tunnels",
    "hub_key_name",
    "hub_networks",
    "load_inventory",
    "parse_inventory",
]
