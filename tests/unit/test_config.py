"""The vpnd directive parser: every directive, every error (with its line), round trips."""

from __future__ import annotations

import textwrap
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpnd_runtime.config import Config, ConfigError, Route, load_config, parse_config

BASE = """\
mode server
local 198.19.0.1
remote 198.19.0.2
"""
CLIENT = """\
mode client
server 198.18.1.1 379
local 198.19.0.2
remote 198.19.0.1
"""
SERIAL = """\
mode server
server /dev/ttyS0
local 198.19.0.1
remote 198.19.0.2
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), "t.conf")


def errors_of(text: str) -> list[ConfigError]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "t.conf")
    return info.value.errors


def only_error(text: str) -> ConfigError:
    errors = errors_of(text)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


# ---- the seed's configuration ------------------------------------------------------------


def test_seed_server_config_parses_with_its_exact_spellings():
    config = parse(
        """
        pidfile /var/run/
        randomdev /dev/urandom
        keepalive 20
        noanswer 6
        mode server
        client 0
        server 24741
        keyfile /etc/vpnd/vpnd.conf-server1
        local 198.19.0.1
        remote 198.19.0.2
        """
    )
    assert config.mode == "server"
    assert (config.server_host, config.server_port) == ("0.0.0.0", 24741)
    assert (config.client_host, config.client_port) == ("0.0.0.0", 0)
    assert config.pidfile == "/var/run/vpnd.pid"
    assert config.randomdev == "/dev/urandom"
    assert (config.keepalive, config.noanswer) == (20.0, 6)
    assert config.keyfile == "/etc/vpnd/vpnd.conf-server1"
    assert (config.local, config.remote) == (IPv4Address("198.19.0.1"), IPv4Address("198.19.0.2"))


def test_defaults_match_the_architecture_contract():
    config = parse(BASE)
    assert config.server_host == "0.0.0.0"
    assert config.server_port == 379
    assert (config.client_host, config.client_port) == ("0.0.0.0", 0)
    assert config.mtu == 1400
    assert config.keyfile == "/etc/vpnd.key"
    assert config.pidfile is None
    assert config.randomdev == "/dev/random"
    assert (config.keepalive, config.noanswer) == (10.0, 3)
    assert config.autoroute is False
    assert config.routes == ()
    assert (config.linkup, config.linkdown, config.slipup, config.slipdown) == (None,) * 4
    assert config.speed == 115200
    assert (config.localline, config.nortscts, config.xfilter) == (False, False, False)
    assert config.modemchat is None
    assert config.ipopts == 0
    assert config.sendbuf == 65536
    assert (config.compress, config.compress_level) == (False, 1)
    assert config.keyttl == 120.0
    assert config.keysize == 256
    assert config.maxdelay is None
    assert config.cipher == "chacha20-poly1305"
    assert config.interface == "vpnd0"
    assert config.statusfile == "/run/vpnd/t.status.json"
    assert config.is_serial is False


def test_config_is_frozen():
    config = parse(BASE)
    with pytest.raises(AttributeError):
        config.mtu = 1500  # type: ignore[misc]


# ---- every directive ----------------------------------------------------------------------

DIRECTIVE_CASES = [
    ("mtu 1500", "mtu", 1500),
    ("mtu 576", "mtu", 576),
    ("mtu 65535", "mtu", 65535),
    ("keyfile /etc/vpnd/l1.key", "keyfile", "/etc/vpnd/l1.key"),
    ("pidfile /run/vpnd-l1.pid", "pidfile", "/run/vpnd-l1.pid"),
    ("randomdev /dev/urandom", "randomdev", "/dev/urandom"),
    ("keepalive 0.5", "keepalive", 0.5),
    ("noanswer 1", "noanswer", 1),
    ("autoroute", "autoroute", True),
    ("autoroute yes", "autoroute", True),
    ("autoroute off", "autoroute", False),
    ("autoroute 0", "autoroute", False),
    ("linkup /etc/vpnd/up.sh", "linkup", "/etc/vpnd/up.sh"),
    ("linkdown /etc/vpnd/down.sh", "linkdown", "/etc/vpnd/down.sh"),
    ("slipup /etc/vpnd/slipup", "slipup", "/etc/vpnd/slipup"),
    ("slipdown /etc/vpnd/slipdown", "slipdown", "/etc/vpnd/slipdown"),
    ("ipopts 0", "ipopts", 0),
    ("ipopts 15", "ipopts", 15),
    ("sendbuf 4096", "sendbuf", 4096),
    ("sendbuf 1024", "sendbuf", 1024),
    ("sendbuf 1048576", "sendbuf", 1048576),
    ("compress", "compress_level", 1),
    ("compress 9", "compress_level", 9),
    ("compress off", "compress", False),
    ("compress 0", "compress", False),
    ("keyttl 30", "keyttl", 30.0),
    ("maxdelay 2.5", "maxdelay", 2.5),
    ("keysize 256", "keysize", 256),
    ("cipher aes-256-gcm", "cipher", "aes-256-gcm"),
    ("cipher aes-128-gcm", "keysize", 128),
    ("cipher chacha20-poly1305", "cipher", "chacha20-poly1305"),
    ("interface vpnd-l1", "interface", "vpnd-l1"),
    ("statusfile /run/vpnd/l1.json", "statusfile", "/run/vpnd/l1.json"),
]


@pytest.mark.parametrize(("line", "field", "value"), DIRECTIVE_CASES)
def test_each_directive_sets_its_field(line: str, field: str, value: object):
    assert getattr(parse(BASE + line + "\n"), field) == value


def test_compress_with_a_level_switches_compression_on():
    config = parse(BASE + "compress 6\n")
    assert (config.compress, config.compress_level) == (True, 6)


def test_cipher_family_aes_gcm_takes_its_size_from_keysize():
    config = parse(BASE + "cipher aes-gcm\nkeysize 128\n")
    assert (config.cipher, config.keysize) == ("aes-128-gcm", 128)
    assert parse(BASE + "cipher aes-gcm\n").cipher == "aes-256-gcm"


def test_server_forms():
    def server(spec: str) -> tuple[str, int]:
        config = parse(BASE.replace("mode server", f"mode server\nserver {spec}"))
        return config.server_host, config.server_port

    assert server("24741") == ("0.0.0.0", 24741)
    assert server("0 24741") == ("0.0.0.0", 24741)
    assert server("198.18.1.1 379") == ("198.18.1.1", 379)
    assert server("198.18.1.1") == ("198.18.1.1", 379)
    assert server("/dev/ttyS0") == ("/dev/ttyS0", 0)


def test_client_forms():
    def client(spec: str) -> tuple[str, int]:
        config = parse(BASE + f"client {spec}\n")
        return config.client_host, config.client_port

    assert client("0") == ("0.0.0.0", 0)
    assert client("0 0") == ("0.0.0.0", 0)
    assert client("198.18.1.2 0") == ("198.18.1.2", 0)
    assert client("198.18.1.2 5000") == ("198.18.1.2", 5000)
    assert client("0 5000") == ("0.0.0.0", 5000)


def test_client_mode_with_a_concrete_server_parses():
    config = parse(CLIENT + "client 0 0\n")
    assert config.mode == "client"
    assert (config.server_host, config.server_port) == ("198.18.1.1", 379)


def test_routes_are_parsed_in_index_order_with_their_network():
    config = parse(
        BASE
        + "route3 198.19.9.0 255.255.255.0 198.19.0.2\n"
        + "route1 198.19.4.0 255.255.252.0 198.19.0.2\n"
        + "route9 198.19.8.1 255.255.255.255 198.19.0.2\n"
    )
    assert [r.index for r in config.routes] == [1, 3, 9]
    assert config.routes[0] == Route(
        1, IPv4Address("198.19.4.0"), IPv4Address("255.255.252.0"), IPv4Address("198.19.0.2")
    )
    assert config.routes[0].network == IPv4Network("198.19.4.0/22")
    assert config.routes[2].network == IPv4Network("198.19.8.1/32")


def test_serial_directives_parse_on_a_serial_link():
    config = parse(
        SERIAL
        + "speed 38400\nlocalline\nnortscts\nxfilter\nmodemchat /etc/vpnd/chat\n"
        + "slipup /etc/vpnd/up\n"
    )
    assert config.is_serial
    assert config.speed == 38400
    assert (config.localline, config.nortscts, config.xfilter) == (True, True, True)
    assert config.modemchat == "/etc/vpnd/chat"


def test_serial_link_accepts_client_any():
    assert parse(SERIAL + "client 0\n").is_serial


# ---- lexical handling ---------------------------------------------------------------------


def test_comments_blank_lines_crlf_tabs_and_trailing_blanks_are_ignored():
    text = (
        "\r\n"
        "# whole-line comment\r\n"
        "   # indented comment\r\n"
        "mode\tserver   # trailing comment\r\n"
        "\r\n"
        "local 198.19.0.1 \t \r\n"
        "\tremote   198.19.0.2\r\n"
        "keyfile /etc/vpnd/a#b.key\r\n"
    )
    config = parse_config(text, "t.conf")
    assert config.mode == "server"
    assert config.remote == IPv4Address("198.19.0.2")
    assert config.keyfile == "/etc/vpnd/a#b.key"  # '#' inside a word is not a comment


def test_line_numbers_count_blank_and_comment_lines():
    error = only_error("\n# c\n\r\n" + BASE.replace("local 198.19.0.1", "local nope"))
    assert error.line == 5
    assert str(error).startswith("t.conf:5: local: ")


def test_utf8_bom_is_ignored():
    assert parse_config("\ufeff" + BASE, "t.conf").mode == "server"


# ---- errors: each names file, line and directive ------------------------------------------

ERROR_CASES = [
    # (extra text appended to BASE (line 4 onwards), line, directive, message fragment)
    ("mtu 575", 4, "mtu", "576..65535"),
    ("mtu 65536", 4, "mtu", "576..65535"),
    ("mtu big", 4, "mtu", "whole number"),
    ("mtu -1", 4, "mtu", "whole number"),
    ("mtu", 4, "mtu", "wrong number of arguments (0)"),
    ("mtu 1500 1400", 4, "mtu", "wrong number of arguments (2)"),
    ("keepalive 0", 4, "keepalive", "greater than 0"),
    ("keepalive nan", 4, "keepalive", "number of seconds"),
    ("keepalive 1e3", 4, "keepalive", "number of seconds"),
    ("noanswer 0", 4, "noanswer", "1.."),
    ("ipopts 16", 4, "ipopts", "0..15"),
    ("sendbuf 1023", 4, "sendbuf", "1024..1048576"),
    ("sendbuf 1048577", 4, "sendbuf", "1024..1048576"),
    ("keysize 192", 4, "keysize", "128 or 256"),
    ("keysize 128", 4, "keysize", "aes-128-gcm"),
    ("cipher aes-128-gcm\nkeysize 256", 5, "keysize", "does not match"),
    ("cipher blowfish", 4, "cipher", "chacha20-poly1305"),
    ("compress 10", 4, "compress", "1..9"),
    ("compress fast", 4, "compress", "level"),
    ("keyttl -5", 4, "keyttl", "number of seconds"),
    ("maxdelay 0", 4, "maxdelay", "greater than 0"),
    ("autoroute maybe", 4, "autoroute", "takes no value"),
    ("interface a-very-long-name0", 4, "interface", "1..15"),
    ("interface a/b", 4, "interface", "'/'"),
    ("server 0", 4, "server", "server port must be 1..65535"),
    ("server 0 0", 4, "server", "1..65535"),
    ("server 0 65536", 4, "server", "1..65535"),
    ("server 198.18.1.300 379", 4, "server", "dotted IPv4"),
    ("server /dev/ttyS0 379", 4, "server", "no port"),
    ("server", 4, "server", "usage: server"),
    ("client 0 65536", 4, "client", "0..65535"),
    ("client host.example 0", 4, "client", "dotted IPv4"),
    ("client 0 0 0", 4, "client", "wrong number"),
    ("route1 198.19.5.0 255.255.255.0", 4, "route1", "usage: route1 <dest> <netmask> <gateway>"),
    ("route1 198.19.5.1 255.255.255.0 198.19.0.2", 4, "route1", "did you mean 198.19.5.0"),
    ("route2 198.19.5.0 255.0.255.0 198.19.0.2", 4, "route2", "not contiguous"),
    ("route2 198.19.5.0 255.255.255.0 198.19.0.256", 4, "route2", "gateway"),
    ("route2 198.19.5.0 255.255.255.0 0.0.0.0", 4, "route2", "unicast"),
    ("route10 198.19.5.0 255.255.255.0 198.19.0.2", 4, "route10", "route1..route9"),
    ("route0 198.19.5.0 255.255.255.0 198.19.0.2", 4, "route0", "route1..route9"),
    ("keepaliv 5", 4, "keepaliv", "did you mean 'keepalive'?"),
    ("Mtu 1500", 4, "Mtu", "did you mean 'mtu'?"),
    ("frobnicate 1", 4, "frobnicate", "unknown directive"),
    ("speed 9600", 4, "speed", "only to serial links"),
    ("localline", 4, "localline", "only to serial links"),
    ("nortscts", 4, "nortscts", "only to serial links"),
    ("xfilter", 4, "xfilter", "only to serial links"),
    ("modemchat /etc/vpnd/chat", 4, "modemchat", "only to serial links"),
    ("mtu 1500\nmtu 1400", 5, "mtu", "duplicate directive (first given on line 4)"),
    ("mode client", 4, "mode", "duplicate"),
]


@pytest.mark.parametrize(("extra", "line", "directive", "fragment"), ERROR_CASES)
def test_bad_directive_is_reported_with_file_line_and_directive(
    extra: str, line: int, directive: str, fragment: str
):
    error = only_error(BASE + extra + "\n")
    assert (error.path, error.line, error.directive) == ("t.conf", line, directive)
    assert str(error).startswith(f"t.conf:{line}: {directive}: ")
    assert fragment in str(error)


def test_bad_mode_value_is_an_error_on_its_line():
    error = only_error(BASE.replace("mode server", "mode peer"))
    assert (error.line, error.directive) == (1, "mode")
    assert "'client' or 'server'" in error.message


def test_missing_mode_is_a_file_level_error():
    error = only_error("local 198.19.0.1\nremote 198.19.0.2\n")
    assert (error.line, error.directive) == (None, "mode")
    assert str(error) == "t.conf: mode: missing required directive: mode client|server"


def test_missing_local_and_remote_are_both_reported():
    errors = errors_of("mode server\n")
    assert [(e.line, e.directive) for e in errors] == [(None, "local"), (None, "remote")]


def test_equal_local_and_remote_point_at_the_remote_line():
    error = only_error("mode server\nlocal 198.19.0.1\nremote 198.19.0.1\n")
    assert (error.line, error.directive) == (3, "remote")
    assert "must differ" in error.message


@pytest.mark.parametrize("address", ["0.0.0.0", "224.0.0.1", "255.255.255.255"])
def test_tunnel_addresses_must_be_unicast(address: str):
    error = only_error(BASE.replace("local 198.19.0.1", f"local {address}"))
    assert (error.line, error.directive) == (2, "local")


def test_client_mode_needs_a_server_directive():
    error = only_error("mode client\nlocal 198.19.0.2\nremote 198.19.0.1\n")
    assert (error.line, error.directive) == (None, "server")


@pytest.mark.parametrize("spec", ["0 379", "24741"])
def test_client_mode_rejects_server_any(spec: str):
    error = only_error(CLIENT.replace("server 198.18.1.1 379", f"server {spec}"))
    assert (error.line, error.directive) == (2, "server")
    assert "not 0 (any)" in error.message


def test_serial_link_rejects_a_client_address_and_ipopts():
    errors = errors_of(SERIAL + "client 198.18.1.2 0\nipopts 4\n")
    assert [(e.line, e.directive) for e in errors] == [(5, "client"), (6, "ipopts")]


def test_serial_speed_must_be_a_line_speed():
    error = only_error(SERIAL + "speed 10000\n")
    assert (error.line, error.directive) == (5, "speed")
    assert "nearest: 9600" in error.message


def test_two_routes_to_the_same_network_are_rejected():
    error = only_error(
        BASE
        + "route1 198.19.5.0 255.255.255.0 198.19.0.2\n"
        + "route2 198.19.5.0 255.255.255.0 198.19.0.2\n"
    )
    assert (error.line, error.directive) == (5, "route2")
    assert "route1" in error.message


def test_all_errors_of_a_file_are_reported_at_once_in_line_order():
    text = "mtu 10\nkeepaliv 3\nroute10 1.2.3.0 255.255.255.0 1.2.3.4\nmtu 1500\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "all.conf")
    error = info.value
    assert [(e.line, e.directive) for e in error.errors] == [
        (1, "mtu"),
        (2, "keepaliv"),
        (3, "route10"),
        (4, "mtu"),
        (None, "mode"),
        (None, "local"),
        (None, "remote"),
    ]
    assert (error.path, error.line, error.directive) == ("all.conf", 1, "mtu")
    lines = str(error).splitlines()
    assert len(lines) == 7
    assert lines[0].startswith("all.conf:1: mtu: ")
    assert lines[-1].startswith("all.conf: remote: ")
    assert isinstance(error, ValueError)


# ---- load_config ---------------------------------------------------------------------------


def test_load_config_resolves_relative_paths_against_the_config_directory(tmp_path: Path):
    conf = tmp_path / "l1.conf"
    conf.write_text(BASE + "keyfile l1.key\nlinkup /bin/true\npidfile run/\n")
    config = load_config(conf)
    assert config.keyfile == str(tmp_path / "l1.key")
    assert config.linkup == "/bin/true"
    assert config.pidfile == str(tmp_path / "run" / "vpnd.pid")
    assert config.statusfile == "/run/vpnd/l1.status.json"
    assert config.source == str(conf)


def test_load_config_names_a_missing_file(tmp_path: Path):
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value).startswith(f"{missing}: cannot read config")


def test_load_config_rejects_non_utf8_with_the_line(tmp_path: Path):
    conf = tmp_path / "bin.conf"
    conf.write_bytes(b"mode server\nlocal \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert info.value.line == 2


# ---- to_text round trip --------------------------------------------------------------------


def test_to_text_of_the_seed_config_reparses_to_an_equal_config():
    config = parse(
        "mode server\nserver 24741\nclient 0\npidfile /var/run/\nlocal 198.19.0.1\n"
        "remote 198.19.0.2\ncompress 6\ncipher aes-gcm\nkeysize 128\nmaxdelay 2.5\n"
        "route1 198.19.5.0 255.255.255.0 198.19.0.2\nautoroute\n"
    )
    assert parse_config(config.to_text(), "t.conf") == config


def test_to_text_of_a_serial_config_reparses_to_an_equal_config():
    config = parse(SERIAL + "speed 9600\nxfilter\nnortscts\nmodemchat /etc/chat\n")
    assert parse_config(config.to_text(), "t.conf") == config


_octet = st.integers(1, 254)
_addr = st.builds(lambda a, b: IPv4Address(f"198.19.{a}.{b}"), _octet, _octet)
_seconds = st.one_of(
    st.integers(1, 3600).map(float),
    st.decimals(min_value="0.001", max_value="999", places=3).map(float).filter(lambda x: x > 0),
)
_segment = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12)
_path = st.lists(_segment, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))


@st.composite
def configs(draw: st.DrawFn) -> Config:
    local, remote = draw(st.lists(_addr, min_size=2, max_size=2, unique=True))
    serial = draw(st.booleans())
    mode = draw(st.sampled_from(["client", "server"]))
    values: dict[str, object] = {"mode": mode, "local": local, "remote": remote}
    if serial:
        values.update(
            server_host=draw(st.sampled_from(["/dev/ttyS0", "/dev/ttyUSB1"])),
            server_port=0,
            speed=draw(st.sampled_from([9600, 38400, 115200, 230400])),
            localline=draw(st.booleans()),
            nortscts=draw(st.booleans()),
            xfilter=draw(st.booleans()),
            modemchat=draw(st.none() | _path),
        )
    else:
        host = (
            draw(_addr.map(str)) if mode == "client" else draw(st.just("0.0.0.0") | _addr.map(str))
        )
        values.update(
            server_host=host,
            server_port=draw(st.integers(1, 65535)),
            client_host=draw(st.just("0.0.0.0") | _addr.map(str)),
            client_port=draw(st.integers(0, 65535)),
            ipopts=draw(st.integers(0, 15)),
        )
    cipher = draw(st.sampled_from(["chacha20-poly1305", "aes-256-gcm", "aes-128-gcm"]))
    compress = draw(st.booleans())
    indices = draw(st.lists(st.integers(1, 9), unique=True, max_size=3))
    routes = tuple(
        Route(i, IPv4Address(f"198.18.{100 + i}.0"), IPv4Address("255.255.255.0"), remote)
        for i in sorted(indices)
    )
    values.update(
        mtu=draw(st.integers(576, 65535)),
        keyfile=draw(_path),
        pidfile=draw(st.none() | _path),
        randomdev=draw(_path),
        statusfile=draw(_path),
        keepalive=draw(_seconds),
        noanswer=draw(st.integers(1, 100)),
        maxdelay=draw(st.none() | _seconds),
        keyttl=draw(_seconds),
        cipher=cipher,
        keysize=128 if cipher == "aes-128-gcm" else 256,
        compress=compress,
        compress_level=draw(st.integers(1, 9)) if compress else 1,
        sendbuf=draw(st.integers(1024, 1048576)),
        autoroute=draw(st.booleans()),
        routes=routes,
        linkup=draw(st.none() | _path),
        linkdown=draw(st.none() | _path),
        slipup=draw(st.none() | _path),
        slipdown=draw(st.none() | _path),
        interface=draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=15)),
    )
    return Config(**values)  # type: ignore[arg-type]


@settings(max_examples=120, deadline=None)
@given(configs())
def test_to_text_reparses_to_an_equal_config_for_any_valid_config(config: Config):
    assert parse_config(config.to_text(), "t.conf") == config


# ---- the shipped examples ------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_server_and_client_configs_parse_and_mirror_each_other():
    server = load_config(EXAMPLES / "server.conf")
    client = load_config(EXAMPLES / "client.conf")
    assert (server.mode, client.mode) == ("server", "client")
    assert (server.local, server.remote) == (client.remote, client.local)
    assert server.server_port == client.server_port
    assert IPv4Address(client.server_host) in IPv4Network("198.18.0.0/15")
    assert server.keyfile == client.keyfile
    assert (server.keepalive, server.noanswer) == (client.keepalive, client.noanswer)
    assert server.routes[0].gateway == server.remote
    assert client.routes[0].gateway == client.remote


# ---- hostile input -------------------------------------------------------------------------

_words = st.one_of(
    st.sampled_from(["mode", "server", "client", "local", "remote", "route1", "route10",
                     "compress", "keysize", "cipher", "aes-gcm", "speed", "0", "/dev/ttyS0",
                     "198.19.0.1", "255.255.255.0", "#", "\t", "\r", "yes", "1e9", "-1"]),
    st.text(max_size=8),
)  # fmt: skip
_hostile_lines = st.lists(st.lists(_words, max_size=5).map(" ".join), max_size=12)


@settings(max_examples=150, deadline=None)
@given(_hostile_lines)
def test_arbitrary_text_only_ever_raises_config_error_with_valid_line_numbers(lines: list[str]):
    text = "\n".join(lines)
    try:
        parse_config(text, "h.conf")
    except ConfigError as error:
        total = text.count("\n") + 1
        for single in error.errors:
            assert single.line is None or 1 <= single.line <= total
            assert str(single).startswith("h.conf")


@pytest.mark.parametrize(
    "path",
    ["/etc/vpnd/a.conf", "a.b.conf", "/x/.hidden", "noext", "/etc/vpnd/", "dir/a.", "a..b",
     "", ".", "..", "/", "x/..", "x/.", "a.conf/", ".a.b", "//etc//b.conf"],
)  # fmt: skip
def test_the_default_status_file_is_named_as_pathlib_would_name_it(path: str) -> None:
    from pathlib import PurePosixPath

    from vpnd_runtime.config import _stem

    assert _stem(path) == PurePosixPath(path).stem
