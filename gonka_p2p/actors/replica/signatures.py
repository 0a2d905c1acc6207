"""Validators' signatures a replica has checked, and which of them its consensus core took.

The consensus topic's validator checks every vote and proposal before it is
relayed (on the network thread), the consensus core checks the same
signature again when the message reaches it (on the loop), and the shell
checks a later height's message before it starts that height.
:class:`CheckedSignatures` remembers the good ones, so each is checked once.

It also tells the relay when a message is worth passing on
(:meth:`CheckedSignatures.due`): one the core has not taken yet, or one not
passed on for a rebroadcast interval. A signature the *core* checked
(:meth:`CheckedSignatures.admit`, its ``verify``) belongs to a message the
core took -- it checks a signature last, after height, round, membership and
duplicates, and then stores the message; one only the relay checked is not
enough (the core may have dropped that message: not started yet while
catching up, the next height's buffer full, a height further on). And a
message every replica holds still needs passing on once an interval: a
replica cut off by a partition hears the round's proposal and votes again
only through rebroadcasts, relayed by replicas that hold them (testnet run
27: refusing those held up recovery from a partition 31 s, against 2).

Only good signatures are kept: a bad one is never relayed, so it costs only
the replica a sender reached directly, once per message, and cannot fill
the table. Thread-safe: a lock guards the table (held for a lookup or an
insertion, never for a check).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from gonka_p2p.identity import digest, verify_signature

KEPT = 1 << 14  # signatures remembered: several heights of votes of the largest validator set


@dataclass
class _Checked:
    admitted: bool  # the core took its message
    relayed_at: float | None = None  # when the relay last passed its message on


class CheckedSignatures:
    """The good signatures checked last, and what became of their messages (module docstring)."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._good: OrderedDict[bytes, _Checked] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(pubkey: bytes, signature: bytes, message: bytes) -> bytes:
        # lengths first: no two (key, signature, message) triples hash the same bytes
        return digest(b"%d,%d," % (len(pubkey), len(signature)) + pubkey + signature + message)

    def due(self, pubkey: bytes, signature: bytes, message: bytes, now: float, every: float) -> bool:
        """Whether the relay should pass this good signature's message on: the core has not
        taken it yet, or it was last passed on ``every`` seconds before ``now`` or earlier.
        Marks it passed on at ``now`` if so; False for a signature not checked good here."""
        with self._lock:
            entry = self._good.get(self._key(pubkey, signature, message))
            if entry is None:
                return False
            if entry.admitted and entry.relayed_at is not None and now - entry.relayed_at < every:
                return False
            entry.relayed_at = now
            return True

    def verify(self, pubkey: bytes, signature: bytes, message: bytes) -> bool:
        """:func:`~gonka_p2p.identity.verify_signature`, checking each good signature once."""
        return self._check(pubkey, signature, message, admit=False)

    def admit(self, pubkey: bytes, signature: bytes, message: bytes) -> bool:
        """:meth:`verify` for the consensus core, whose good signatures are of messages it took."""
        return self._check(pubkey, signature, message, admit=True)

    def _check(self, pubkey: bytes, signature: bytes, message: bytes, admit: bool) -> bool:
        key = self._key(pubkey, signature, message)
        with self._lock:
            entry = self._good.get(key)
            if entry is not None:
                entry.admitted |= admit
                self._good.move_to_end(key)
                return True
        if not verify_signature(pubkey, signature, message):
            return False
        with self._lock:
            entry = self._good.setdefault(key, _Checked(admit))
            entry.admitted |= admit
            while len(self._good) > self._kept:
                self._good.popitem(last=False)
        return True
