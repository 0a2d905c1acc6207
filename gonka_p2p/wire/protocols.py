"""Every stream protocol id and gossip topic the network speaks, in one table.

One line per id: how it travels (a gossipsub topic, or a direct stream of one
request frame then response frames) and what travels on it. The schemas live
in ``wire/messages.py`` (serving path), ``ledger/consensus_wire.py`` and
``ledger/query.py`` (ledger). The trailing ``/1`` is the protocol version: a
change that old peers cannot read gets a new id, never a new meaning for this
one.
"""

from __future__ import annotations

# ---- gossipsub topics ----------------------------------------------------------
ANNOUNCE_TOPIC = "/gonka/announce/1"  # signed Announcement: a peer's addrs, models, capacity (refreshed)
CONSENSUS_TOPIC = "/gonka/ledger/consensus/1"  # ConsensusMessage(seq, proposals, votes) between replicas
TX_TOPIC = "/gonka/ledger/txs/1"  # TxBatch: signed ledger transactions, batched per node

# ---- streams (one request frame, then response frames) ---------------------------
INFER_PROTOCOL = "/gonka/infer/1"  # client -> TA: InferenceRequest; back: the executor's signed frames, relayed
INFO_PROTOCOL = "/gonka/info/1"  # client -> TA: empty; back: NetworkInfo (live executors and their models)
EXECUTE_PROTOCOL = "/gonka/execute/1"  # TA -> executor: ExecuteOrder; back: InferenceStarted, TokenBatch*, InferenceFinished
ARTIFACT_PROTOCOL = "/gonka/artifact/1"  # validator -> executor or TA: ArtifactQuery; back: ArtifactReply
SYNC_PROTOCOL = "/gonka/ledger/sync/1"  # replica -> peer: SyncRequest; back: CommitRecord* (catch-up)
BLOCK_PROTOCOL = "/gonka/ledger/block/1"  # replica -> peer: BlockRequest; back: BlockBody (large proposals)
QUERY_PROTOCOL = "/gonka/ledger/query/1"  # client -> node: a ledger query or SubmitTx; back: its reply
