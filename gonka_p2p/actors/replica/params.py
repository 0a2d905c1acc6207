"""The replica's tunables and counters: one record of parameters (with units) and one of metrics.

They live apart from the code that reads them so that an operator, a test or
a benchmark can see every knob of the replica shell, and every number it
reports, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from gonka_p2p.ledger.consensus_types import DEFAULT_PARAMS, ConsensusParams
from gonka_p2p.ledger.consensus_wire import MAX_SYNC_COUNT, MAX_TXS_PER_BATCH
from gonka_p2p.ledger.mempool import MempoolParams


@dataclass(frozen=True)
class ReplicaParams:
    """Every tunable of the replica shell, with units."""

    consensus: ConsensusParams = DEFAULT_PARAMS
    mempool: MempoolParams = MempoolParams()
    # At most one batch of own transactions is gossiped per tx_flush_s (a first one at once), unless
    # tx_flush_count wait. Measured (benchmarks/ledger_bench.py, 4 processes on 2 shared cores):
    # 0.05 s batches overload py-libp2p at 1,200 tx/s (every batch costs each peer ms of CPU, per
    # copy) and commits collapse; 0.2 s batches commit it all with lower latency at every rate tried.
    tx_flush_s: float = 0.2
    tx_flush_count: int = 512
    # Blocks this replica proposes are capped so that one height's work (fetching, validating,
    # storing, applying) stays well inside the propose timeout even when the machine is busy:
    # a height that times out makes the next block bigger still.
    max_block_txs: int = 2_000
    max_block_bytes: int = 1024 * 1024
    commit_wait_s: float = 0.0  # pause after a commit before the next height (lets blocks fill)
    empty_block_interval_s: float = 5.0  # an idle chain still commits a block this often
    max_clock_drift_ms: int = 30_000  # block 1's time may lead our clock by this much (later: BFT time)
    # Gossip relays every message through every mesh peer, so each replica receives a proposal
    # several times: blocks over inline_block_bytes travel as a CompactBlock (tx hashes) if that is
    # at most compact_block_bytes, and are fetched over a stream by whoever cannot rebuild them.
    inline_block_bytes: int = 64 * 1024
    compact_block_bytes: int = 256 * 1024
    snapshot_interval: int = 100  # blocks between state snapshots in the store
    sync_batch: int = 32  # blocks per catch-up request (<= MAX_SYNC_COUNT)
    request_timeout_s: float = 10.0  # catch-up requests
    body_timeout_s: float = 2.0  # fetching a proposal's body from one peer, before asking the next
    receipts_kept: int = 100_000  # receipts remembered for wait_for_commit after the fact

    def __post_init__(self) -> None:
        if not (1 <= self.sync_batch <= MAX_SYNC_COUNT and 1 <= self.tx_flush_count <= MAX_TXS_PER_BATCH):
            raise ValueError(f"sync_batch must be in 1..{MAX_SYNC_COUNT}, tx_flush_count in 1..{MAX_TXS_PER_BATCH}")
        if self.max_block_bytes > self.consensus.max_block_bytes:
            raise ValueError("max_block_bytes exceeds what consensus accepts (consensus.max_block_bytes)")


@dataclass
class ReplicaMetrics:
    """Where the replica's time went (seconds, summed) and what it did (counts), for benchmarks.

    Work is measured in CPU seconds of the thread doing it (``time.thread_time``),
    so a busy machine does not inflate it; waits (the disk, the network, a
    height) in wall seconds.
    """

    tx_checks_s: float = 0.0  # CPU: stateless checks of gossiped batches (decoding, signatures)
    batches_checked: int = 0  # transaction batches received (each copy gossip delivers)
    mempool_s: float = 0.0  # CPU: admission and re-checks
    build_s: float = 0.0  # CPU
    validate_s: float = 0.0  # CPU
    apply_s: float = 0.0  # CPU: apply_block and the next validator set
    store_block_s: float = 0.0  # wall: block + certificate written and synced
    store_safety_s: float = 0.0  # wall: safety state written and synced, before each signed message
    safety_writes: int = 0
    snapshot_s: float = 0.0  # wall
    publish_s: float = 0.0  # wall: waiting for gossip to take a publication
    consensus_published: int = 0  # gossip messages sent: consensus ...
    batches_published: int = 0  # ... and transaction batches
    proposals_rebuilt: int = 0  # compact proposals rebuilt from the mempool
    bodies_fetched: int = 0  # proposal bodies fetched over a stream
    heights: int = 0
    rounds: int = 0  # sum of the commit round of each height (0 = decided in its first round)
    height_s: float = 0.0  # summed wall time from a height's start to its commit
    # The same, phase by phase, over the heights where this replica signed both its votes (wall):
    phased_heights: int = 0
    to_prevote_s: float = 0.0  # height start -> own prevote signed (proposal built or received, validated)
    to_precommit_s: float = 0.0  # -> own precommit signed (> 2/3 prevotes heard)
    to_decision_s: float = 0.0  # -> decision (> 2/3 precommits heard)
    commit_s: float = 0.0  # decision -> block stored, applied, acknowledged (every height)
    catchup_blocks: int = 0
