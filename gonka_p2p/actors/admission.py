"""What a transfer agent and an executor both check before a signed request costs them work.

A client's signed request is public once its ``StartInference`` is in a block,
so its bytes prove nothing about who sent them or whether anyone pays. Both
the TA (admitting the client's request) and the executor (accepting the TA's
order) therefore ask the same questions, each answered with a stable code:

* ``wrong_chain`` -- the client signed it for another network;
* ``stale`` -- its timestamp is outside the freshness window of this node's
  clock (the ledger's ``request_window_ms`` when there is a ledger), outside
  which the ledger would refuse to start it anyway;
* ``replay`` -- its :func:`~gonka_p2p.wire.messages.inference_id` (that is,
  (chain, client, nonce)) was already started on the committed ledger, or was
  already taken here within the window (:class:`ReplayGuard`, bounded by the
  window): the ledger remembers what survives a restart, the guard what has
  not committed yet.

The executor also asks who ordered it (``unknown_ta``: the order's signer is
not a registered participant on the committed ledger), see
``actors/executor.py``. Without a ledger (an ad-hoc network that charges
nothing) only the chain id, the window and the guard apply.

The committed state is the replica's live one, handed over by the node's
commit listener: it is read synchronously, between two awaits, never held
across one.
"""

from __future__ import annotations

from collections import OrderedDict

from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.tx_rules import request_seen
from gonka_p2p.wire.envelope import Signed
from gonka_p2p.wire.messages import InferenceRequest, inference_id

REQUEST_WINDOW_S = 60.0  # freshness window without a ledger (the ledger's own wins when there is one)
# The chain id of an ad-hoc network (no genesis): it charges nothing, so one name for all of them.
ADHOC_CHAIN_ID = "gonka-adhoc"


class Rejected(Exception):
    """A request or order refused before any work; ``code`` is what the client is told."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReplayGuard:
    """Remembers the inference ids taken within one timestamp window; bounded by the window
    (an id older than the window is refused as stale anyway) and by ``capacity``."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # id -> the node's time it was taken (ms)
        self._capacity = capacity

    def check_and_record(self, iid: bytes, window_ms: int, now_ms: int) -> None:
        while self._seen and (
            len(self._seen) >= self._capacity
            or next(iter(self._seen.values())) < now_ms - 2 * window_ms
        ):
            self._seen.popitem(last=False)
        if iid in self._seen:
            raise Rejected("replay", "this request (client, nonce) was already received")
        self._seen[iid] = now_ms


def window_ms(ledger: LedgerState | None) -> int:
    """The freshness window: the ledger's, or :data:`REQUEST_WINDOW_S` without one."""
    return ledger.params.request_window_ms if ledger is not None else int(REQUEST_WINDOW_S * 1000)


def check_request(request: Signed[InferenceRequest], chain_id: str, ledger: LedgerState | None,
                  guard: ReplayGuard, now_ms: int) -> bytes:
    """Chain, freshness and replay checks (in that order); records the request in ``guard``
    and returns its inference id, or raises :class:`Rejected`."""
    req = request.message
    if req.chain_id != chain_id:
        raise Rejected("wrong_chain", f"the request was signed for network {req.chain_id!r}, "
                                      f"this is {chain_id!r}")
    window = window_ms(ledger)
    if abs(now_ms - req.timestamp_ms) > window:
        raise Rejected("stale", f"request timestamp is {abs(now_ms - req.timestamp_ms) / 1000:.0f} s "
                                f"from this node's clock (window {window / 1000:.0f} s)")
    iid = inference_id(request)
    if ledger is not None and request_seen(ledger, iid):
        raise Rejected("replay", "this request (client, nonce) was already started on the ledger")
    guard.check_and_record(iid, window, now_ms)
    return iid
