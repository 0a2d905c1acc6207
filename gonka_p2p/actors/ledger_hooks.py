"""What the serving path asks of the ledger: admit by balance, record Start and Finish.

The transfer agent and the executor know nothing about blocks; they call
three hooks, which this class implements on top of the node's
:class:`~gonka_p2p.actors.replica.Replica`:

* ``admit`` (TA, before routing): the client's *available* balance -- its
  committed balance minus the escrow of this TA's requests that are admitted
  but whose ``StartInference`` has not committed yet -- must cover the
  request's escrow (:func:`~gonka_p2p.ledger.rules.escrow_for`) and the
  Start's fee (``tx_fee``, the client's to pay), else the
  request is refused with ``insufficient_balance``. Without the reservation
  a client could open many requests at once against one balance; the ledger
  would then reject all but the first Start, after executors did the work.
  A reservation lasts until its Start commits (or fails), or ``reservation_s``
  if the request never starts.
* ``on_start`` (TA, when the executor's first frame arrives): submit
  ``StartInference`` signed by this TA, wrapping the client's request
  envelope byte for byte, naming the actual executor and the draw (attempt)
  that picked it, which the ledger recomputes.
* ``on_finished`` (executor, after its last frame): submit
  ``FinishInference`` with the token counts, response hash and artifact
  commitment.

Submission never waits for a block: it is admission to the local mempool.
Following the transaction to its block is the work of :meth:`run`, the
transaction follower, which the node supervises: each submitted transaction
is followed in a task of its TaskGroup. A transaction that has not reached
the pool, or left it uncommitted, for a reason that can pass (the pool or
this account's quota is full, it was evicted, a sequence conflict: an earlier
one of ours failed in the same block) is re-signed with a fresh sequence and
submitted again, after a backoff doubling from ``retry_first_s`` up to
``retry_max_s``, for at most ``retry_for_s``; a refusal no retry can cure
(the ledger says the work is closed, a duplicate, ...), a rejection in its
block, or no commit within ``COMMIT_TIMEOUT_S`` (it may still be pending:
signing it again could apply it twice) ends the follow-up, logged. The
caller's ``done(committed)`` learns the outcome, so a duty counts as done
only once its transaction committed. Anything else is a bug: it fails the
TaskGroup, so :meth:`run` crashes and the supervisor reports it and restarts
the follower (transactions it was following stay in the mempool; only their
follow-up is lost).
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

COMMIT_TIMEOUT_S = 300.0
# Refusals and drops that may pass: the mempool's room and order, never the ledger's verdict --
# but for a full holding area, which a Finish leaves behind once its Start commits.
RETRYABLE = frozenset({"mempool_full", "account_quota", "sequence_taken", "too_far_ahead", "evicted",
                       Reason.BAD_SEQUENCE.value, Reason.HOLDING_AREA_FULL.value})


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
    tx_hash: bytes | None  # None: not in the mempool (refused), to submit again
    done: Callable[[bool], object]  # called once its fate is known: committed and applied?


class LedgerHooks:
    def __init__(self, replica: Replica, key: Keypair, reservation_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, retry_first_s: float = 0.5,
                 retry_max_s: float = 10.0, retry_for_s: float = 300.0) -> None:
        self._replica = replica
        self._key = key
        self._reservation_s = reservation_s
        self._clock = clock
        self._retry_first_s = retry_first_s
        self._retry_max_s = retry_max_s
        self._retry_for_s = retry_for_s
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
        fee = state.params.tx_fee  # the client pays the Start's fee too (transactions.Payer.CLIENT)
        client = request.signer_id
        available = state.balance(client) - self.reserved(client)
        if escrow + fee > available:
            return ("insufficient_balance",
                    f"this request escrows {escrow} coins (prompt bound + max_tokens, at {price} per token) "
                    f"and pays a fee of {fee}; the available balance of {client} is {available}")
        self._reservations[inference_id(request)] = _Reservation(client, escrow + fee,
                                                                 self._clock() + self._reservation_s)
        return None

    def reserved(self, client: str) -> int:
        """Escrow of ``client``'s admitted requests whose Start has not committed."""
        now = self._clock()
        self._reservations = {i: r for i, r in self._reservations.items() if r.expires > now}
        return sum(r.escrow for r in self._reservations.values() if r.client == client)

    def on_start(self, request: Signed[InferenceRequest], executor: str, attempt: int) -> None:
        iid = inference_id(request)
        reservation = self._reservations.get(iid)
        if reservation is not None:  # held until the Start commits, however long that takes
            self._reservations[iid] = _Reservation(reservation.client, reservation.escrow, float("inf"))
        chain_id = self._replica.chain_id

        def build(sequence: int) -> bytes:
            return seal(StartInference(chain_id=chain_id, request=request.raw, executor=executor,
                                       attempt=attempt, sequence=sequence), self._key)

        self.follow(build, f"StartInference {iid.hex()[:12]}",
                     lambda committed: self._reservations.pop(iid, None))

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
               done: Callable[[bool], object] = lambda committed: None) -> None:
        """Sign (``build(sequence)``) and submit now, or later if the mempool refuses it for now;
        :meth:`run` sees it to its block (the caller's path never waits) and then calls
        ``done(committed)``. Also how the validator sends its transactions."""
        try:
            tx_hash = self._submit(build, what)
        except TxRefused as e:
            log.warning("%s refused by the mempool: %s", what, e)
            done(False)
            return
        self._submitted.put_nowait(_Submitted(build, what, tx_hash, done))

    def _submit(self, build: Callable[[int], bytes], what: str) -> bytes | None:
        """The hash of the transaction admitted now, or None if refused for now (raises
        :class:`TxRefused` if no retry can cure the refusal)."""
        try:
            return self._replica.submit(build(self._replica.next_sequence(self._key.peer_id)))
        except TxRefused as e:
            if e.code not in RETRYABLE:
                raise
            log.info("%s refused for now: %s", what, e)
            return None

    async def _until_committed(self, tx: _Submitted) -> None:
        committed = False
        try:
            committed = await self._see_through(tx)
        except (TxRefused, TimeoutError, ReplicaStopped) as e:
            log.warning("%s not committed: %s", tx.what, e)
        finally:
            tx.done(committed)

    async def _see_through(self, tx: _Submitted) -> bool:
        """Submit (again) until the transaction commits; whether it applied."""
        tx_hash, delay, give_up = tx.tx_hash, self._retry_first_s, self._clock() + self._retry_for_s
        while True:
            if tx_hash is None:
                tx_hash = self._submit(tx.build, tx.what)
            if tx_hash is not None:
                try:
                    committed = await self._replica.wait_for_commit(tx_hash, COMMIT_TIMEOUT_S)
                except TxDropped as e:
                    if e.code not in RETRYABLE:
                        log.warning("%s left the mempool uncommitted: %s", tx.what, e)
                        return False
                else:
                    if committed.receipt.reason not in (Reason.BAD_SEQUENCE, Reason.HOLDING_AREA_FULL):
                        if not committed.receipt.ok:
                            log.warning("%s rejected at height %d: %s %s", tx.what, committed.height,
                                        committed.receipt.reason, committed.receipt.detail)
                        return committed.receipt.ok
                tx_hash = None
            if self._clock() + delay > give_up:
                log.warning("%s: still not admitted after %.0f s, given up", tx.what, self._retry_for_s)
                return False
            await asyncio.sleep(delay)
            delay = min(2 * delay, self._retry_max_s)
