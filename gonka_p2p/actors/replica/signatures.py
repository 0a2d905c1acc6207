"""Validators' signatures a replica has checked, and which of them its consensus core took.

The consensus topic's validator checks every vote and proposal before it is
relayed (on the network thread), the consensus core checks the same
signature again when the message reaches it (on the loop), and the shell
checks a later height's message before it starts that height.
:class:`CheckedSignatures` remembers the good ones, so each is checked once.

It also tells the relay what is nothing new: a signature the *core* checked
(:meth:`CheckedSignatures.admit`, its ``verify``) belongs to a message the
core took -- it checks a signature last, after height, round, membership and
duplicates, and then stores the message. A signature only the relay checked
is not enough: the core may have dropped that message (not started yet
while catching up, the next height's buffer full, a height further on), and
a later rebroadcast of it must reach the core.

Only good signatures are kept: a bad one is never relayed, so it costs only
the replica a sender reached directly, once per message, and cannot fill
the table. Thread-safe: a lock guards the table (held for a lookup or an
insertion, never for a check).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from gonka_p2p.identity import digest, verify_signature

KEPT = 1 << 14  # signatures remembered: several heights of votes of the largest validator set


class CheckedSignatures:
    """The good signatures checked last, each marked if the core took its message (module docstring)."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._good: OrderedDict[bytes, bool] = OrderedDict()  # key -> the core took it
        self._lock = threading.Lock()

    @staticmethod
    def _key(pubkey: bytes, signature: bytes, message: bytes) -> bytes:
        # lengths first: no two (key, signature, message) triples hash the same bytes
        return digest(b"%d,%d," % (len(pubkey), len(signature)) + pubkey + signature + message)

    def admitted(self, pubkey: bytes, signature: bytes, message: bytes) -> bool:
        """Whether the core checked this signature: its message is nothing new to this replica."""
        with self._lock:
            return self._good.get(self._key(pubkey, signature, message), False)

    def verify(self, pubkey: bytes, signature: bytes, message: bytes) -> bool:
        """:func:`~gonka_p2p.identity.verify_signature`, checking each good signature once."""
        return self._check(pubkey, signature, message, admit=False)

    def admit(self, pubkey: bytes, signature: bytes, message: bytes) -> bool:
        """:meth:`verify` for the consensus core, whose good signatures are of messages it took."""
        return self._check(pubkey, signature, message, admit=True)

    def _check(self, pubkey: bytes, signature: bytes, message: bytes, admit: bool) -> bool:
        key = self._key(pubkey, signature, message)
        with self._lock:
            if key in self._good:
                self._good[key] = self._good[key] or admit
                self._good.move_to_end(key)
                return True
        if not verify_signature(pubkey, signature, message):
            return False
        with self._lock:
            self._good[key] = self._good.get(key, False) or admit
            while len(self._good) > self._kept:
                self._good.popitem(last=False)
        return True
