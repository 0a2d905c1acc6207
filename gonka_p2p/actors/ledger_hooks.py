"""What the serving path asks of the ledger: admit by balance, record Start and Finish.

The transfer agent and the executor know nothing about blocks; they call
three hooks, which this class implements on top of the node's
:class:`~gonka_p2p.actors.replica.Replica`:

* ``admit`` (TA, before routing): the client's *available* balance -- its
  committed balance minus the escrow of this TA's requests that are admitted
  but whose ``StartInference`` has not committed yet -- must cover the
  request's escrow (:func:`~gonka_p2p.ledger.rules.escrow_for`), else the
  request is refused with ``insufficient_balance``. Without the reservation
  a client could open many requests at once against one balance; the ledger
  would then reject all but the first Start, after executors did the work.
  A reservation lasts until its Start commits (or fails), or ``reservation_s``
  if the request never starts.
* ``on_start`` (TA, when the executor's first frame arrives): submit
  ``StartInference`` signed by this TA, wrapping the client's request
  envelope byte for byte, naming the actual executor.
* ``on_finished`` (executor, after its last frame): submit
  ``FinishInference`` with the token counts, response hash and artifact
  commitment.

Submission never waits for a block: it is admission to the local mempool.
Following the transaction to its block is the work of :meth:`run`, the
transaction follower, which the node supervises: each submitted transaction
is followed in a task of its TaskGroup. A transaction whose block rejected
it for ``bad_sequence`` (an earlier one of ours failed in the same block, so
the sequence did not advance) is re-signed with a fresh sequence, a few
times; any other outcome (refused, dropped, rejected, not committed in
time) is an expected fate of a transaction and is logged. Anything else is
a bug: it fails the TaskGroup, so :meth:`run` crashes and the supervisor
reports it and restarts the follower (transactions it was following stay in
the mempool; only their follow-up is lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gonka_p2p.actors.replica import Replica, ReplicaStopped, TxDropped
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.ledger.mempool import TxRefused
from gonka_p2p.ledger.rules import escrow_for, prompt_token_bound
from gonka_p2p.ledger.transactions import FinishInference, Reason, StartInference
from gonka_p2p.wire.envelope import Signed, seal
from gonka_p2p.wire.messages import InferenceRequest, inference_id

log = logging.getLogger(__name__)

SUBMIT_ATTEMPTS = 3
COMMIT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class _Reservation:
    client: str
    escrow: int
    expires: float  # monotonic; only while the Start is not submitted


@dataclass(frozen=True)
class _Submitted:
    """A transaction in the mempool that the follower must see to its block."""

    build: Callable[[int], bytes]  # sequence -> the signed transaction (to re-sign it)
    what: str  # for the log
    tx_hash: bytes
    done: Callable[[], object]  # called once its fate is known


class LedgerHooks:
    def __init__(self, replica: Replica, key: Keypair, reservation_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._replica = replica
        self._key = key
        self._reservation_s = reservation_s
        self._clock = clock
        self._reservations: dict[bytes, _Reservation] = {}  # inference id -> its escrow, held
        self._submitted: asyncio.Queue[_Submitted] = asyncio.Queue()  # waiting for the follower

    async def run(self) -> None:
        """The transaction follower: see every submitted transaction to its block."""
        async with asyncio.TaskGroup() as tasks:
            while True:
                tasks.create_task(self._until_committed(await self._submitted.get()))

    # ---- the transfer agent's hooks --------------------------------------------------

    async def admit(self, request: Signed[InferenceRequest]) -> tuple[str, str] | None:
        state = self._replica.state
        req = request.message
        price = state.params.price_per_token.get(req.model)
        if price is None:
            return "unknown_model", f"{req.model!r} has no price on this network"
        escrow = escrow_for(prompt_token_bound(req, state.params), req.max_tokens, price)
        client = request.signer_id
        available = state.balance(client) - self.reserved(client)
        if escrow > available:
            return ("insufficient_balance",
                    f"this request escrows {escrow} coins (prompt bound + max_tokens, at {price} per token); "
                    f"the available balance of {client} is {available}")
        self._reservations[inference_id(request)] = _Reservation(client, escrow, self._clock() + self._reservation_s)
        return None

    def reserved(self, client: str) -> int:
        """Escrow of ``client``'s admitted requests whose Start has not committed."""
        now = self._clock()
        self._reservations = {i: r for i, r in self._reservations.items() if r.expires > now}
        return sum(r.escrow for r in self._reservations.values() if r.client == client)

    def on_start(self, request: Signed[InferenceRequest], executor: str) -> None:
        iid = inference_id(request)
        reservation = self._reservations.get(iid)
        if reservation is not None:  # held until the Start commits, however long that takes
            self._reservations[iid] = _Reservation(reservation.client, reservation.escrow, float("inf"))
        chain_id = self._replica.chain_id

        def build(sequence: int) -> bytes:
            return seal(StartInference(chain_id=chain_id, request=request.raw, executor=executor,
                                       sequence=sequence), self._key)

        self.follow(build, f"StartInference {iid.hex()[:12]}",
                     lambda: self._reservations.pop(iid, None))

    # ---- the executor's hook ---------------------------------------------------------

    async def on_finished(self, request: Signed[InferenceRequest], artifact: InferenceArtifact,
                          response_hash: bytes) -> None:
        chain_id = self._replica.chain_id

        def build(sequence: int) -> bytes:
            return seal(FinishInference(
                chain_id=chain_id, inference_id=inference_id(request), prompt_tokens=len(artifact.prompt_ids),
                completion_tokens=len(artifact.steps), response_hash=response_hash,
                artifact_commitment=artifact.commitment(), sequence=sequence), self._key)

        self.follow(build, f"FinishInference {inference_id(request).hex()[:12]}")

    # ---- submission ------------------------------------------------------------------

    def follow(self, build: Callable[[int], bytes], what: str,
               done: Callable[[], object] = lambda: None) -> None:
        """Sign (``build(sequence)``) and submit now; :meth:`run` sees it to its block (the
        caller's path never waits). Also how the validator sends its transactions."""
        try:
            tx_hash = self._replica.submit(build(self._replica.next_sequence(self._key.peer_id)))
        except TxRefused as e:
            log.warning("%s refused by the mempool: %s", what, e)
            done()
            return
        self._submitted.put_nowait(_Submitted(build, what, tx_hash, done))

    async def _until_committed(self, tx: _Submitted) -> None:
        build, what, tx_hash = tx.build, tx.what, tx.tx_hash
        try:
            for attempt in range(SUBMIT_ATTEMPTS):
                if attempt:
                    tx_hash = self._replica.submit(build(self._replica.next_sequence(self._key.peer_id)))
                try:
                    committed = await self._replica.wait_for_commit(tx_hash, COMMIT_TIMEOUT_S)
                except TxDropped as e:
                    if e.code == Reason.BAD_SEQUENCE:
                        continue
                    log.warning("%s left the mempool uncommitted: %s", what, e)
                    return
                if committed.receipt.reason is Reason.BAD_SEQUENCE:
                    continue
                if not committed.receipt.ok:
                    log.warning("%s rejected at height %d: %s %s", what, committed.height,
                                committed.receipt.reason, committed.receipt.detail)
                return
            log.warning("%s: gave up after %d sequence conflicts", what, SUBMIT_ATTEMPTS)
        except (TxRefused, TimeoutError, ReplicaStopped) as e:
            log.warning("%s not committed: %s", what, e)
        finally:
            tx.done()
