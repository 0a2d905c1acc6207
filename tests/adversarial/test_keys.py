"""Attack class: key exposure. A secret never appears in a repr, a log line or an error,
and a key file other users can read is refused with the command that fixes it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from gonka_p2p.identity import KeyFileError, Keypair

KEY = Keypair.from_seed(b"adversarial-keys")


def test_repr_str_and_format_never_show_the_secret() -> None:
    secret = KEY.secret.hex()
    for shown in (repr(KEY), str(KEY), f"{KEY}", f"{KEY!r}", repr([KEY]), repr({"k": KEY})):
        assert secret not in shown
        assert KEY.peer_id in shown


def test_a_logged_key_shows_its_peer_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("gonka.test").info("serving with %s %r", KEY, KEY)
    assert KEY.secret.hex() not in caplog.text


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    KEY.save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as caught:
        Keypair.load(path)
    message = str(caught.value)
    assert f"chmod 600 {path}" in message
    assert KEY.secret.hex() not in message


def test_a_private_key_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    KEY.save(path)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert Keypair.load(path) == KEY
    assert Keypair.load_or_create(path) == KEY


def test_a_garbled_key_file_error_does_not_echo_its_content(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_text(KEY.secret.hex()[:-2] + "zz\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        Keypair.load(path)
    assert KEY.secret.hex()[:-2] not in str(caught.value)
