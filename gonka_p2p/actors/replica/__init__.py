"""The ledger replica: one per node, the I/O shell around consensus, the state machine, the mempool and the store.

It does only what the sans-I/O cores (``ledger/consensus.py``,
``ledger/state.py``, ``ledger/mempool.py``) cannot: talk, wait, write. One
collaborator per job, each a module you can read in one sitting:

=====================  ==================================================================
``actor.py``           :class:`Replica`: wires the collaborators, owns their tasks, public API
``runtime.py``         the driver's event queue and the TaskGroup every background task runs in
``driver.py``          the one task that calls the core and executes its actions; timers; heights
``chain.py``           the committed chain: SQLite store, recovery, the one commit path, waiters
``sync.py``            catch-up: blocks and certificates fetched from peers and served to them
``proposals.py``       proposal bodies: build, validate, compact, rebuild, fetch, serve
``consensus_gossip.py`` proposals and votes on the consensus topic
``tx_gossip.py``       transactions: batched out, checked in
``params.py``          :class:`ReplicaParams` (every tunable, with units) and :class:`ReplicaMetrics`
=====================  ==================================================================

These names are the package's interface; the modules above are its inside.
"""

from gonka_p2p.actors.replica.actor import Replica
from gonka_p2p.actors.replica.chain import Committed, ReplicaStopped, TxDropped
from gonka_p2p.actors.replica.params import ReplicaMetrics, ReplicaParams

__all__ = ["Committed", "Replica", "ReplicaMetrics", "ReplicaParams", "ReplicaStopped", "TxDropped"]
