import pytest

from splitserve.engine.auth import secret_matches


def test_the_right_secret_matches():
    assert secret_matches("s3cret", "s3cret")
    assert secret_matches("key-2", "key-1", "key-2", "key-3")


@pytest.mark.parametrize("given", ["s3creT", "s3cre", "s3crett", " s3cret", "x"])
def test_a_wrong_secret_does_not(given):
    assert not secret_matches(given, "s3cret")
    assert not secret_matches(given, "key-1", "s3cret-2")


def test_no_accepted_secret_matches_nothing():
    assert not secret_matches("s3cret")


@pytest.mark.parametrize("given", [None, "", b""])
def test_a_missing_or_empty_secret_never_matches(given):
    assert not secret_matches(given, "s3cret")
    assert not secret_matches(given, "", b"")


def test_an_empty_accepted_secret_admits_no_one():
    assert not secret_matches("s3cret", "")
    assert secret_matches("s3cret", "", "s3cret")


def test_non_ascii_secrets_compare_as_utf8():
    assert secret_matches("clé-ü-密钥", "clé-ü-密钥")
    assert secret_matches("clé-ü-密钥", "clé-ü-密钥".encode())
    assert not secret_matches("cle-u-密钥", "clé-ü-密钥")
    assert not secret_matches("clé", "cle\u0301")  # other code points, same glyphs: not equal


def test_bytes_and_str_are_interchangeable():
    assert secret_matches(b"s3cret", "s3cret")
    assert secret_matches("s3cret", b"s3cret")
    assert secret_matches(b"s3cret", b"other", b"s3cret")
    assert not secret_matches(b"s3cret", "S3CRET")
    assert secret_matches(bytearray(b"s3cret"), "s3cret")
