"""The simulated chain: transactions due at a height are signed, put in a block, and applied
to the real :class:`~gonka_p2p.ledger.state.LedgerState`.

Consensus is simulated only when the scenario asks (:mod:`sim.consensus_run`
then gives each height its commit time, and the run ends where the chain
stops); otherwise every block commits, one per virtual second. What is real is everything the economics
depend on -- each transaction is a sealed secp256k1 envelope that
``apply_block`` decodes, verifies and judges, in block order, with the
signer's exact next sequence. Like the live network's
:meth:`~gonka_p2p.actors.ledger_hooks.LedgerHooks.follow`, a transaction is
signed with its sequence only when it goes out, and one that lost its
sequence to an earlier rejection of the same signer is re-signed for the
next block, a few times; every other rejection is counted by (kind, reason)
and reported, because an honest simulated actor should never cause one.

Coins are checked at every block: the state machine's own incremental
invariant (``apply_block`` raises on any imbalance) and, here, the full sum
``balances + escrow + pending fees == genesis supply + minted - burned`` (transaction
fees are burned).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.block import Block, Receipt
from gonka_p2p.ledger.genesis import Genesis
from gonka_p2p.ledger.state import LedgerState, apply_block
from gonka_p2p.ledger.transactions import Reason, Tx
from gonka_p2p.wire.envelope import seal

BLOCK_MS = 1_000
SUBMIT_ATTEMPTS = 3  # re-signed after a sequence conflict (BAD_SEQUENCE), as the live hooks re-sign it
# (LedgerHooks._see_through); they retry on a clock for retry_for_s, virtual time has none: three
# blocks stand in for it, and no honest simulated actor needs more (their sequences are assigned here)


class ConservationError(AssertionError):
    """Coins were created or destroyed outside the reward schedule: a ledger bug."""


@dataclass
class Pending:
    signer: Keypair
    build: Callable[[int], Tx]  # sequence -> the transaction
    on_receipt: Callable[[Receipt], None] | None = None
    attempts: int = 0


class Chain:
    def __init__(self, genesis: Genesis, proposers: list[str], commit_ms: tuple[int, ...] = ()) -> None:
        self.state = LedgerState.from_genesis(genesis)
        self._proposers = proposers
        self._commit_ms = commit_ms  # virtual ms after genesis at which each height committed (if simulated)
        self._due: dict[int, list[Pending]] = {}
        self.rejected: Counter[tuple[str, str]] = Counter()  # (tx kind, reason) -> count
        self.accepted: Counter[str] = Counter()  # tx kind -> count
        self.conservation_checks = 0

    @property
    def height(self) -> int:
        return self.state.height

    def submit(self, height: int, signer: Keypair, build: Callable[[int], Tx],
               on_receipt: Callable[[Receipt], None] | None = None) -> None:
        """Send a transaction so that it lands in block ``height`` (at the earliest the next)."""
        self._due.setdefault(max(height, self.height + 1), []).append(Pending(signer, build, on_receipt))

    def step(self) -> list[Receipt]:
        """Build, apply and check the next block; run each transaction's receipt callback."""
        state = self.state
        height = state.height + 1
        pending = self._due.pop(height, [])
        sequences: dict[str, int] = {}
        raws = []
        for item in pending:
            peer = item.signer.peer_id
            account = state.account(peer)
            sequence = sequences.get(peer, account.sequence if account else 0)
            sequences[peer] = sequence + 1
            raws.append(seal(item.build(sequence), item.signer))
        block = Block(height, state.last_block_hash, self._proposers[height % len(self._proposers)],
                      self.time_of(height), raws)
        _, receipts = apply_block(state, block)
        self._check_conservation()
        for item, receipt in zip(pending, receipts, strict=True):
            if receipt.reason is Reason.BAD_SEQUENCE and item.attempts + 1 < SUBMIT_ATTEMPTS:
                item.attempts += 1
                self._due.setdefault(height + 1, []).append(item)
                continue
            if receipt.ok:
                self.accepted[receipt.kind] += 1
            else:
                self.rejected[(receipt.kind, str(receipt.reason))] += 1
            if item.on_receipt is not None:
                item.on_receipt(receipt)
        return receipts

    def time_of(self, height: int) -> int:
        """Block ``height``'s time: its simulated commit, else one second after the one before."""
        if self._commit_ms:
            return max(self.state.genesis.genesis_time_ms + self._commit_ms[height - 1], self.state.time_ms + 1)
        return self.state.time_ms + BLOCK_MS

    def _check_conservation(self) -> None:
        state = self.state
        expected = state.genesis.supply + state.minted - state.burned
        total = state.total_coins()
        if total != expected:
            raise ConservationError(f"height {state.height}: balances + escrow + fees = {total}, "
                                    f"genesis supply + minted - burned = {expected}")
        self.conservation_checks += 1
