"""Known answers for the Noise HASH/HMAC/HKDF over BLAKE2s.

The HKDF vectors are WireGuard's (wireguard-go device/kdf_test.go, TestKDF): KDF1/KDF2/KDF3 there
are our `hkdf(key, input, 1..3)`.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest

from vpnd_runtime.proto.kdf import hash_, hkdf, hmac_, key_id

WIREGUARD_KDF_VECTORS = [
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


@pytest.mark.parametrize(("key", "ikm", "t0", "t1", "t2"), WIREGUARD_KDF_VECTORS)
def test_hkdf_reproduces_wireguard_kdf1_kdf2_kdf3_vectors(
    key: str, ikm: str, t0: str, t1: str, t2: str
) -> None:
    k, i = bytes.fromhex(key), bytes.fromhex(ikm)
    assert [x.hex() for x in hkdf(k, i, 3)] == [t0, t1, t2]
    assert [x.hex() for x in hkdf(k, i, 2)] == [t0, t1]
    assert [x.hex() for x in hkdf(k, i, 1)] == [t0]


def test_hash_and_hmac_are_blake2s_256() -> None:
    assert hash_(b"abc") == hashlib.blake2s(b"abc").digest()
    assert hmac_(b"key", b"data") == hmac.new(b"key", b"data", hashlib.blake2s).digest()


def test_hkdf_refuses_more_than_three_outputs() -> None:
    with pytest.raises(ValueError, match="1 to 3"):
        hkdf(b"", b"", 4)


def test_key_id_is_four_bytes_and_differs_between_keys() -> None:
    a, b = key_id(bytes(32)), key_id(bytes(31) + b"\x01")
    assert len(a) == 4
    assert a != b
    assert key_id(bytes(32)) == a
