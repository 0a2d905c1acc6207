"""Transaction gossip: own transactions out in batches, peers' batches checked and into the mempool.

**Out.** :meth:`TxGossip.submit` admits a signed transaction to the mempool
(or raises :class:`TxRefused`) and returns at once; the transaction joins a
:class:`TxBatch` on the tx topic: one batch at most every ``tx_flush_s`` (at
once after a quiet spell), or as soon as ``tx_flush_count`` are waiting, and
never while consensus has something to publish. An own transaction still
pending ``REGOSSIP_FIRST_BLOCKS`` blocks after it was gossiped goes out again,
then after twice as many blocks, and so on until a block takes it or the
mempool drops it: peers drop a whole batch whose transaction their committed
state refuses, and a transaction sent as its phase opens (a proof-of-compute
secret) reaches peers that have not yet applied the block opening it. A
sender that proposes no blocks (a joiner) then held it alone until the phase
closed; seen as a stranger earning no weight (stop 28).

**In.** The topic's validator (run before delivery and forwarding, possibly
on the network thread) relays a batch only if it brings this node something
new, and nothing it refuses (``Mempool.novelty``, per transaction):

- no transaction ``check_tx`` refuses against the committed state -- its
  stateless checks (size, envelope, signature, schema, chain id) and every
  rule a block would apply, so an unknown signer, one that cannot pay the
  fee or a bad sequence is never relayed -- nor one whose (signer,
  sequence) another pending transaction, or an earlier one of the batch,
  holds, nor one past the mempool's ``max_ahead``. Otherwise one funded key
  signs one sequence with a thousand amounts, each valid against committed
  state, and every version crosses the whole network for one fee at most.
- at least one transaction new to this node's mempool. Those it holds
  already, and those a block has used since the sender published, travel
  beside them (a sender gossips again what no block took, some of which
  peers hold; a sender whose replica lags a block or two -- a participant
  behind a NAT -- sends transactions peers have committed since), but alone
  they are re-publication, or replayed history, which cost the sender a
  message and every node a delivery, a check and a forward.

The work per message is bounded: at most ``MAX_TXS_PER_BATCH``
transactions, each a hash lookup or one ``check_tx`` (a signature, and for
a StartInference the client's, plus lookups), stopping at the first
refusal. The committed state is read from
the network thread while the loop may be applying a block to it; a read
torn by that (an index changing size under it) counts as "not judged" and
the batch is let through, since the handler's mempool admission re-checks
every transaction on the loop. The handler offers each transaction to the
mempool.

Memory: the outbox, the set of hashes not yet gossiped and the own
transactions awaiting a block hold only own transactions the mempool
admitted (so its bounds bound them); the first two are emptied by each
flush, the last as blocks take or the mempool drops them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from gonka_p2p.gossip.service import MessageValidator
from gonka_p2p.identity import digest
from gonka_p2p.ledger.consensus_wire import TxBatch
from gonka_p2p.ledger.mempool import Mempool, Novelty, TxRefused
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.protocols import TX_TOPIC
from gonka_p2p.wire.schema import WireError

from gonka_p2p.actors.replica.chain import Chain
from gonka_p2p.actors.replica.params import ReplicaMetrics, ReplicaParams
from gonka_p2p.actors.replica.runtime import Publish
from gonka_p2p.wire.unsigned import decode_frame, encode_frame

MAX_GOSSIP_BYTES = 900_000  # under the gossip layer's ~1 MB limit, with room for framing
REGOSSIP_FIRST_BLOCKS = 2  # blocks an own pending transaction waits before it is gossiped again


@dataclass
class _Own:
    """An own transaction in the mempool, and when it is gossiped again if no block takes it."""

    raw: bytes
    due: int  # height
    wait: int  # blocks between its last gossip and ``due``


class TxGossip:
    """Own transactions out, peers' transactions in (module docstring)."""

    def __init__(self, chain: Chain, mempool: Mempool, wake: Callable[[], None],
                 publish: Publish, consensus_idle: asyncio.Event, params: ReplicaParams,
                 metrics: ReplicaMetrics) -> None:
        self._chain = chain
        self._mempool = mempool
        self._wake = wake  # the mempool has something: the next height may start
        self._publish = publish
        self._consensus_idle = consensus_idle
        self._params = params
        self._metrics = metrics
        self._outbox: list[bytes] = []
        self._unannounced: set[bytes] = set()  # hashes of own transactions not gossiped yet
        self._own: dict[bytes, _Own] = {}  # own transactions awaiting a block
        self._waiting = asyncio.Event()
        self._full = asyncio.Event()

    def submit(self, raw: bytes) -> bytes:
        """Admit a signed transaction to the mempool and gossip it soon; returns its hash."""
        started = time.thread_time()
        tx = self._mempool.add(self._chain.state, raw)
        self._metrics.mempool_s += time.thread_time() - started
        self._outbox.append(tx.raw)
        self._unannounced.add(tx.tx_hash)
        height = self._chain.state.height
        self._own[tx.tx_hash] = _Own(tx.raw, height + REGOSSIP_FIRST_BLOCKS, REGOSSIP_FIRST_BLOCKS)
        self._waiting.set()
        if len(self._outbox) >= self._params.tx_flush_count:
            self._full.set()
        self._wake()
        return tx.tx_hash

    def on_commit(self, state: LedgerState) -> None:
        """After each block: gossip again the own transactions still pending at their due
        height, each next time after twice the wait (module docstring)."""
        for tx_hash, own in list(self._own.items()):
            if tx_hash not in self._mempool:
                del self._own[tx_hash]
            elif state.height >= own.due:
                own.wait *= 2
                own.due = state.height + own.wait
                self._outbox.append(own.raw)
                self._waiting.set()

    def announced(self, tx_hash: bytes) -> bool:
        """Whether peers can have this transaction (a compact block may name it by hash only)."""
        return tx_hash not in self._unannounced

    def validator(self) -> MessageValidator:
        """Relay a batch that brings something new and nothing refused (module docstring);
        safe on the network thread."""
        chain = self._chain
        mempool = self._mempool
        metrics = self._metrics

        def relayable(txs: list[bytes]) -> bool:
            new = False
            slots: set[tuple[str, int]] = set()
            for raw in txs:
                novelty, slot = mempool.novelty(chain.state, raw)
                if novelty is Novelty.REFUSED or slot in slots:
                    return False
                if slot is not None:
                    slots.add(slot)
                new |= novelty is Novelty.NEW
            return new

        def validate(sender: str, data: bytes) -> bool:
            started = time.thread_time()
            try:
                return relayable(decode_frame(data, TxBatch).txs)
            except WireError:
                return False
            except RuntimeError:  # a read torn by a block being applied: the mempool judges
                return True
            finally:
                metrics.tx_checks_s += time.thread_time() - started
                metrics.batches_checked += 1

        return validate

    async def on_message(self, sender: str, data: bytes) -> None:
        try:
            batch = decode_frame(data, TxBatch)
        except WireError:
            return
        started = time.thread_time()
        for raw in batch.txs:
            try:
                self._mempool.add(self._chain.state, raw)
            except TxRefused:
                pass  # known, already committed, or no longer valid: nothing to do
        self._metrics.mempool_s += time.thread_time() - started
        self._wake()

    async def flush(self) -> None:
        """Gossip own transactions in batches, at most one every ``tx_flush_s`` unless a batch is full.

        Gossip costs per message (py-libp2p: milliseconds of CPU on every
        peer, for every copy), not per byte, so under load batches must be
        few and large; but a transaction arriving after a quiet spell goes
        out at once rather than waiting for company.
        """
        loop = asyncio.get_running_loop()
        last = -self._params.tx_flush_s
        while True:
            await self._waiting.wait()
            wait = last + self._params.tx_flush_s - loop.time()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._full.wait(), wait)
                except TimeoutError:
                    pass
            last = loop.time()
            txs, self._outbox = self._outbox, []
            self._waiting.clear()
            self._full.clear()
            batch: list[bytes] = []
            size = 0
            for raw in txs:  # a backlog goes out in batches of tx_flush_count: every peer checks a
                # whole batch on its network thread before relaying it, so batches must stay short
                if batch and (len(batch) >= self._params.tx_flush_count or size + len(raw) > MAX_GOSSIP_BYTES):
                    await self._publish_batch(batch)
                    batch, size = [], 0
                batch.append(raw)
                size += len(raw)
            if batch:
                await self._publish_batch(batch)

    async def _publish_batch(self, txs: list[bytes]) -> None:
        await self._consensus_idle.wait()
        await self._publish(TX_TOPIC, encode_frame(TxBatch(txs=txs)))
        self._unannounced.difference_update(digest(tx) for tx in txs)
        self._metrics.batches_published += 1
