"""The prover actor: takes part in every proof-of-compute round, and judges others' rounds.

Theory of operation
-------------------
Like the validator it keeps no schedule of its own: after each committed block it reads
the open rounds (``poc_rounds.open_rounds``) and does what their phase asks
(``ledger/poc.py`` has the round's anatomy):

* **compute** -- for each model it serves (the confirmation round: each model it committed
  in the epoch's regular round), it runs nonces through the serving engine (``inference.poc.PocCompute``)
  from the round's first block until ``COMMIT_MARGIN_BLOCKS`` before the window closes,
  then commits the Merkle root and count with the hash of its round secret. A node that is
  not a participant yet joins here: the commitment carries its addresses and a join stamp
  (hashcash, computed in a thread). The engine keeps serving clients meanwhile: nonces
  and requests share its batches, so the network keeps serving through the window and a
  request in flight at its edge completes as any other (the window only lowers this
  participant's nonce count, and everyone's alike under equal load).
* **secret** -- opens the secret (derived from its key: a restart recovers it).
* **reveal** -- opens the sampled leaves with their Merkle proofs. The leaves live in
  memory only: a prover restarted between commit and reveal cannot open, and that round
  leaves it unproven (weight 0 for one epoch), never wrongly weighted.
* **verdict** -- when it holds voting power in the epoch, it recomputes every other
  prover's opened leaves on its own engine as soon as they are opened (the reveal phase,
  all provers at once) and sends the verdicts when the verdict phase opens, so the
  recomputation never eats into the verdict window; a model it does not serve, it cannot
  judge (others do: the ledger counts a model's verdicts out of the power of the validators
  whose registry entries list it, ``poc_rounds.verdicts``).

A replica that is replaying blocks committed long ago (a joiner or a restarted node
catching up) does none of this: the rounds it sees open closed long ago by the network's
clock, and the nonces it would compute for them (until replay passed their window) took the
cores the replay needs. It acts again from the first block that is no older than
``CATCHING_UP_LAG_S``; a window still open then is joined with what is left of it.

Its transactions go to the node's follower through a :class:`DutyLedger`, so none is
sent twice while in flight; everything else is re-derived from committed state. Compute
runs as tasks of :meth:`run`'s TaskGroup; the node supervises :meth:`run`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gonka_p2p.actors.duty_ledger import DutyActor, TxFollower
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.poc import PocCompute, check_leaves
from gonka_p2p.ledger.genesis import MAX_ADDRS
from gonka_p2p.ledger.poc import (
    Phase,
    RoundKind,
    compute_blocks,
    derive_secret,
    find_join_stamp,
    secret_hash,
)
from gonka_p2p.ledger.poc_rounds import OpenRound, open_rounds, sampled, to_judge
from gonka_p2p.ledger.rules import epoch_of
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.transactions import PocCommit, PocReveal, PocSecret, PocVerdict
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.merkle import inclusion_proof, merkle_root

log = logging.getLogger(__name__)

COMMIT_MARGIN_BLOCKS = 2  # stop computing this many blocks before the window's last, to commit in time
# A block this much older than this node's clock was committed long ago: the replica is catching
# up. Far above a live block's age at its commit (the consensus rounds it took, and clock skew).
CATCHING_UP_LAG_S = 60


class ProverActor(DutyActor):
    def __init__(self, key: Keypair, engines: dict[str, Engine], chain_id: str, submitter: TxFollower,
                 addrs: Callable[[], list[str]], clock: Callable[[], float] = time.time) -> None:
        """``addrs``: this node's dialable addresses, registered when it joins; ``clock``:
        wall time in seconds, against which block times tell a replay from the present."""
        super().__init__(key, submitter)
        self._engines = engines
        self._chain_id = chain_id
        self._addrs = addrs
        self._clock = clock
        self._computing: dict[tuple[int, RoundKind, str], PocCompute] = {}
        self._leaves: dict[tuple[int, RoundKind, str], list[bytes]] = {}  # what was committed
        self._checked: dict[tuple[int, RoundKind, str, str], bool] = {}  # (round, prover, model) -> ok

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            while True:
                await self.next_commit()
                await self.step(tasks)

    async def step(self, tasks: asyncio.TaskGroup) -> None:
        """Everything due now in the open rounds of the current epoch."""
        state = self._live()
        if not state.params.poc_enabled:
            return
        epoch_now = epoch_of(state.height + 1, state.params)
        self._duties.forget(lambda epoch: epoch < epoch_now)
        for memo in (self._leaves, self._checked):
            for key in [k for k in memo if k[0] < epoch_now]:
                del memo[key]
        self._stop_due(state)
        if self._catching_up(state):
            return
        for open_round in open_rounds(state):
            for model in self._models_for(open_round):
                self._act(open_round, model, tasks)
            if open_round.phase in (Phase.REVEAL, Phase.VERDICT):
                await self._judge(open_round)

    def _catching_up(self, state: LedgerState) -> bool:
        return self._clock() * 1000 - state.time_ms > CATCHING_UP_LAG_S * 1000

    def _stop_due(self, state: LedgerState) -> None:
        """Stop every computation whose window is about to close (or closed while this replica
        was catching up), so that its commitment can still land in time."""
        for (epoch, kind, _model), compute in self._computing.items():
            record = state.poc_rounds.get((epoch, kind))
            if record is None or state.height + 1 >= self._stop_at(record.start, kind, state):
                compute.stop()

    @staticmethod
    def _stop_at(start: int, kind: RoundKind, state: LedgerState) -> int:
        return start + compute_blocks(kind, state.params) - 1 - COMMIT_MARGIN_BLOCKS

    def _models_for(self, open_round: OpenRound) -> list[str]:
        """Every served model in a regular round; in a confirmation, those it committed in the
        epoch's regular round."""
        if open_round.kind is RoundKind.REGULAR:
            return sorted(self._engines)
        entries = self._live().poc_entries
        return [m for m in sorted(self._engines) if (open_round.epoch, RoundKind.REGULAR, self.me, m) in entries]

    def _act(self, open_round: OpenRound, model: str, tasks: asyncio.TaskGroup) -> None:
        state = self._live()
        epoch, kind, record = open_round.epoch, open_round.kind, open_round.record
        key = (epoch, kind, model)
        entry = state.poc_entries.get((epoch, kind, self.me, model))
        if open_round.phase is Phase.COMPUTE and entry is None:
            if (key not in self._computing and key not in self._leaves
                    and state.height + 1 < self._stop_at(record.start, kind, state)):
                compute = PocCompute(self._engines[model], record.work_seed, self._key.public_key)
                self._computing[key] = compute
                tasks.create_task(self._compute(key, compute))
        elif open_round.phase is Phase.SECRET and entry is not None and not entry.secret:
            secret = derive_secret(self._key.secret, self._chain_id, epoch, kind, model)
            self._duties.once(epoch, ("poc-secret", (kind, model)), lambda s: seal(PocSecret(
                chain_id=self._chain_id, epoch=epoch, round=kind, model=model, secret=secret, sequence=s),
                self._key))
        elif open_round.phase is Phase.REVEAL and entry is not None and entry.secret and not entry.opened:
            leaves = self._leaves.get(key)
            if leaves is None or merkle_root(leaves) != entry.root:
                return  # committed before a restart: this round cannot be opened
            indices = sampled(state, epoch, kind, self.me, model)
            opened = [leaves[i] for i in indices]
            proofs = [inclusion_proof(leaves, i) for i in indices]
            self._duties.once(epoch, ("poc-reveal", (kind, model)), lambda s: seal(PocReveal(
                chain_id=self._chain_id, epoch=epoch, round=kind, model=model, leaves=opened, proofs=proofs,
                sequence=s), self._key))

    async def _compute(self, key: tuple[int, RoundKind, str], compute: PocCompute) -> None:
        """Run one window's nonces, then commit them (joining the network if need be)."""
        epoch, kind, model = key
        try:
            leaves = await compute.run()
        finally:
            del self._computing[key]
        if not leaves:
            log.warning("proof of compute: no nonce done for %s in the window of epoch %d", model, epoch)
            return
        self._leaves[key] = leaves
        state = self._live()
        stamp = 0
        joining = state.participant(self.me) is None
        if joining:
            stamp = await asyncio.to_thread(find_join_stamp, self._chain_id, epoch, self._key.public_key,
                                            state.params.poc_join_pow_bits)
        root = merkle_root(leaves)
        commitment = secret_hash(derive_secret(self._key.secret, self._chain_id, epoch, kind, model))
        addrs = self._addrs()[:MAX_ADDRS] if joining else []
        log.info("proof of compute: %d nonces on %s in epoch %d (%s round)%s", len(leaves), model, epoch,
                 kind.name.lower(), ", joining" if joining else "")
        self._duties.once(epoch, ("poc-commit", (kind, model)), lambda s: seal(PocCommit(
            chain_id=self._chain_id, epoch=epoch, round=kind, model=model, root=root, count=len(leaves),
            secret_hash=commitment, addrs=addrs, join_stamp=stamp, sequence=s), self._key))

    async def _judge(self, open_round: OpenRound) -> None:
        """Recompute others' opened leaves of the models this node serves as soon as they are
        opened (the reveal phase), all provers at once, and send each verdict once the verdict
        phase opens: the recomputation never eats into the verdict window."""
        epoch, kind = open_round.epoch, open_round.kind
        info = self._live().epoch_info(epoch)
        if info is None or not info.weights.get(self.me):
            return
        due = [(prover, model, entry) for prover, model, entry in to_judge(self._live(), epoch, kind, self.me)
               if model in self._engines and (epoch, kind, prover, model) not in self._checked
               and self._live().participant(prover) is not None]
        await asyncio.gather(*(self._check(open_round, prover, model, entry.leaves) for prover, model, entry in due))
        if open_round.phase is not Phase.VERDICT:
            return
        for (e, k, prover, model), ok in sorted(self._checked.items()):
            if (e, k) == (epoch, kind):
                self._duties.once(epoch, ("poc-verdict", (kind, prover, model)), lambda s, ok=ok, p=prover, m=model:
                                  seal(PocVerdict(chain_id=self._chain_id, epoch=epoch, round=kind, prover=p, model=m,
                                                  ok=ok, sequence=s), self._key))

    async def _check(self, open_round: OpenRound, prover: str, model: str, leaves: tuple[bytes, ...]) -> None:
        epoch, kind = open_round.epoch, open_round.kind
        participant = self._live().participant(prover)
        indices = sampled(self._live(), epoch, kind, prover, model)
        if participant is None or len(indices) != len(leaves):
            return
        check = await check_leaves(self._engines[model], open_round.record.work_seed, participant.pubkey, model,
                                   dict(zip(indices, leaves, strict=True)))
        if not check.ok:
            log.warning("proof of compute: %s's %s sample fails: %s", prover, model, check.reason)
        self._checked[(epoch, kind, prover, model)] = check.ok
