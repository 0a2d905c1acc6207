"""The validator actor: checks the inferences the ledger says it must, and votes on disputes.

Theory of operation
-------------------
Everything it must do is a function of committed state and its own secret,
so it polls the state after each committed block rather than keeping a
schedule of its own (nothing to persist, nothing lost by a restart):

* **Seeds.** Its secret seed for epoch *e* is derived from its private key
  (``derive_validation_seed``). While *e - 1* runs it commits to the seed
  (``CommitValidationSeed``); once *e* has ended and every duty of it is
  sent (or its checks have closed), before it settles, it reveals it
  (``RevealValidationSeed``), which claims its epoch reward -- and lets every
  replica recompute its duties and count any it skipped.
* **Duties.** ``state.validation_duties(e, me, seed)`` lists the settled
  inferences it must check. For each one it has not checked yet it fetches
  the client's signed request and the artifact from the executor, or else
  from the TA that relayed and kept it (``/gonka/artifact/1``), re-runs the
  committed model teacher-forced over the exact ids (one prefill in the
  serving engine, the top ``EVIDENCE_TOP_K`` logprobs per position: no second
  copy of the model, see ``inference/topk_evidence.py``; an output that leaves
  undecidable positions is scored again there over the whole vocabulary,
  ``inference/served_check.py``), applies
  the verification metric and submits a ``Validation``. The client's signed
  request is the contract (``verification.Contract``): prompt, parameters,
  ``max_tokens`` and seed come from it, never from the artifact, and the
  counts the ledger bills must be the artifact's. An artifact that neither
  serves, or that does not match the ledger's commitment, is a withheld
  verdict: a failure. A holder the network did not reach (no answer at all)
  is asked again every ``RETRY_AFTER_BLOCKS`` until ``ACCUSE_MARGIN_BLOCKS``
  before the deadline (``accuse_unreachable``): a crash or a partition must not
  look like withholding, and the committee that reaches the evidence later
  would overturn the accusation at the accuser's cost. The TA is asked beside
  an executor that keeps silent (``evidence_fetch``'s hedge), and a fetch still
  unanswered ``GIVE_UP_BEFORE_BLOCKS`` before the deadline is given up, so
  the accusation can still commit. Whatever else goes wrong with the evidence
  is a failed verdict too (:meth:`judge` is total); only this node's own
  faults are not.
* **Disputes.** When it sits on the committee of an open dispute it checks
  the inference itself in the same way and submits a ``DisputeVote``.

The state it reads
------------------
The replica hands commit listeners its live committed state, the object the
next ``apply_block`` mutates in place (a copy per block would cost more than
the block): reading it is free, and any read is consistent with one height
as long as no ``await`` comes between. So this actor never mutates it, and
carries nothing read from it across an ``await`` but snapshots: the fresh
lists a query returns (``validation_duties``, ``open_disputes_for``) and the
frozen records (``Inference``, ``SeedCommitment``); never a table or its
``rows``. After every ``await`` it reads again, from the newest state: a
block may have opened, resolved or pruned anything meanwhile.

Tasks and memory
----------------
Each committed block starts a step, and a step runs its checks side by side:
their fetches wait on the network at once (``evidence_fetch`` bounds them, and
what a silent holder can cost), their re-runs take turns in the engine (they
share the cores with serving). A duty under way is not started again. All of
it lives inside :meth:`run`, which the node supervises: a crash is reported
and the actor restarted, and since every duty is recomputed from committed
state it resumes where it stopped. Its transactions go to the node's transaction
follower. A duty is done only once its transaction commits: until the
follower reports its fate it is in flight (not sent twice), and if it never
commits (refused to the end, rejected) it is due again at the next step. It
remembers what has committed (or what it cannot judge) per epoch, and
forgets an epoch once it has settled: nothing about it is accepted after,
so the memory holds at most the three epochs it acts on.
"""

from __future__ import annotations

import asyncio
import logging

from gonka_p2p.actors.duty_ledger import DutyActor, TxFollower
from gonka_p2p.actors.evidence_fetch import RETRY_AFTER_BLOCKS, Evidence, EvidenceFetcher, HeightWatch, Unreachable
from gonka_p2p.actors.executor import sampling_params
from gonka_p2p.gossip.service import NetworkService
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import ArtifactError, InferenceArtifact
from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.served_check import check_in_engine
from gonka_p2p.inference.verification import Billed, Contract, Verdict, check_scorable, rejected
from gonka_p2p.inference.verification_params import VerificationParams
from gonka_p2p.ledger.poc_rounds import may_commit_seed
from gonka_p2p.ledger.records import Inference
from gonka_p2p.ledger.rules import (
    DisputeOutcome,
    seed_commit_open,
    seed_commitment,
    seed_reveal_open,
    settlement_height,
    validation_deadline,
)
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.transactions import (
    CommitValidationSeed,
    DisputeVote,
    RevealValidationSeed,
    Validation,
    VerdictStats,
    derive_validation_seed,
    verdict_stats,
    withheld_verdict,
)
from gonka_p2p.wire.envelope import seal

log = logging.getLogger(__name__)

ACCUSE_MARGIN_BLOCKS = 5  # within this many blocks of its deadline an unreachable holder is accused
GIVE_UP_BEFORE_BLOCKS = 3  # a fetch unanswered this close to the deadline ends: the accusation must commit
DutyKey = tuple[int, tuple[str, bytes]]  # (epoch, ("check" or "vote", inference id))


def accuse_unreachable(height: int, deadline: int) -> bool:
    """Whether evidence still unreachable at ``height`` is to be judged withheld now, for a check
    or vote the ledger accepts up to ``deadline``. Before, the validator asks again: a crash, a
    partition or lossy links must not make an honest executor look like a withholder -- and
    an accusation the committee overturns, once it reaches the evidence, costs the accuser."""
    return deadline - height <= ACCUSE_MARGIN_BLOCKS


class ValidatorActor(DutyActor):
    def __init__(
        self,
        service: NetworkService,
        key: Keypair,
        engines: dict[str, Engine],
        params: VerificationParams,
        chain_id: str,
        submitter: TxFollower,
    ) -> None:
        super().__init__(key, submitter)  # its duties: (what, epoch or inference id) per epoch
        self._heights = HeightWatch()
        self._evidence = EvidenceFetcher(service, key, self._heights)
        self._engines = engines
        self._params = params
        self._chain_id = chain_id
        self.checked = 0
        self._ask_again: dict[DutyKey, int] = {}  # -> the height from which to ask again for unreachable evidence
        self._judging: set[DutyKey] = set()  # checks and votes under way
        self._engine_turn = asyncio.Lock()  # re-runs one at a time: they share the cores with serving

    async def run(self) -> None:
        """A step per committed block, each in its own task: a check still waiting for its
        evidence (up to the fetch timeout) holds up none of the next blocks' duties."""
        async with asyncio.TaskGroup() as steps:
            while True:
                await self.next_commit()
                steps.create_task(self.step())

    def on_commit(self, state: LedgerState) -> None:
        super().on_commit(state)
        self._heights.advance(state.height)

    def note_lagged(self, heights: int) -> None:
        """This node's replica fetched ``heights`` decided heights it had missed: its links failed
        it (an outage, a freeze, a restart), so the silence it heard meanwhile accuses no one
        (``evidence_fetch``). If a check's deadline passes before it hears the evidence, the
        duty is skipped: the validator's own epoch reward pays for its outage, not an honest
        executor's standing, nor an overturned accusation."""
        log.info("replica caught up %d heights: evidence unreached meanwhile accuses no one", heights)
        self._evidence.note_impaired()

    def seed(self, epoch: int) -> bytes:
        return derive_validation_seed(self._key.secret, self._chain_id, epoch)

    def remembered_epochs(self) -> list[int]:
        """The epochs whose sent transactions this actor still remembers."""
        return self._duties.epochs()

    async def step(self) -> None:
        """Everything due now: seeds to commit, checks and dispute votes (side by side, each
        one not already under way), then the reveals they allow."""
        if self._state is None:
            return
        self._duties.forget(self._settled)
        self._ask_again = {k: h for k, h in self._ask_again.items() if not self._settled(k[0])}
        now = self._live().epoch
        epochs = [e for e in (now - 1, now, now + 1) if e >= 0 and not self._settled(e)]
        async with asyncio.TaskGroup() as checks:
            for epoch in epochs:
                self._commit_seed(epoch)
                commitment = self._live().commitment(epoch, self.me)
                if commitment is None or epoch > now or commitment.revealed:
                    continue  # the next epoch's duties do not exist yet; a revealed epoch's are closed
                for iid in self._live().validation_duties(epoch, self.me, self.seed(epoch)):
                    if not self._check_sent(epoch, iid) and self._due((epoch, ("check", iid))):
                        checks.create_task(self._check(epoch, iid, dispute=False))
            for iid in self._live().open_disputes_for(self.me):
                dispute = self._live().dispute(iid)
                if (dispute is not None and dispute.outcome is DisputeOutcome.OPEN
                        and not self._duties.sent(dispute.epoch, ("vote", iid))
                        and self._due((dispute.epoch, ("vote", iid)))):
                    checks.create_task(self._check(dispute.epoch, iid, dispute=True))
        for epoch in epochs:
            if not self._settled(epoch):
                self._reveal_seed(epoch)

    def _check_sent(self, epoch: int, inference_id: bytes) -> bool:
        """Its check of this duty is committed, on its way, or given up here."""
        return self.me in self._live().validations(inference_id) or self._duties.sent(epoch, ("check", inference_id))

    def _due(self, key: DutyKey) -> bool:
        """Not under way, nor waiting to ask again for evidence it could not reach."""
        return key not in self._judging and self._live().height >= self._ask_again.get(key, 0)

    def _settled(self, epoch: int) -> bool:
        """Has ``epoch`` settled? Then no seed, check or vote for it is accepted any more."""
        state = self._live()
        return state.height >= settlement_height(epoch, state.params)

    def _commit_seed(self, epoch: int) -> None:
        state = self._live()
        if (seed_commit_open(epoch, state.height, state.params) and state.commitment(epoch, self.me) is None
                and may_commit_seed(state, epoch, self.me)):
            self._duties.once(epoch, ("commit", epoch), lambda s: seal(CommitValidationSeed(
                chain_id=self._chain_id, epoch=epoch,
                commitment=seed_commitment(epoch, self.me, self.seed(epoch)), sequence=s), self._key))

    def _reveal_seed(self, epoch: int) -> None:
        """After the epoch's checks: a reveal closes its duties, and the ledger counts each one
        not checked by then as skipped (the whole epoch reward). So it waits while a duty is
        still unsent -- evidence out of reach, asked again until its accusation margin --
        unless the checks have closed, when waiting gains nothing."""
        state = self._live()
        commitment = state.commitment(epoch, self.me)
        if (commitment is not None and not commitment.revealed
                and seed_reveal_open(epoch, state.height, state.params)
                and (state.height >= validation_deadline(epoch, state.params)
                     or all(self._check_sent(epoch, iid)
                            for iid in state.validation_duties(epoch, self.me, self.seed(epoch))))):
            self._duties.once(epoch, ("reveal", epoch), lambda s: seal(RevealValidationSeed(
                chain_id=self._chain_id, epoch=epoch, seed=self.seed(epoch), sequence=s), self._key))

    async def _check(self, epoch: int, inference_id: bytes, dispute: bool) -> None:
        key = (epoch, ("vote" if dispute else "check", inference_id))
        self._judging.add(key)
        try:
            await self._judge_and_send(epoch, inference_id, dispute)
        finally:
            self._judging.discard(key)

    async def _judge_and_send(self, epoch: int, inference_id: bytes, dispute: bool) -> None:
        record = self._live().inference(inference_id)
        deadline = self._deadline(epoch, inference_id, dispute)
        if record is None or deadline is None or self._live().height > deadline:
            return  # nothing to check, or the ledger takes it no more
        what = "vote" if dispute else "check"
        verdict = await self.judge(inference_id, record, give_up_at=deadline - GIVE_UP_BEFORE_BLOCKS)
        if verdict is None:  # this node cannot judge it: say so once, not after every block
            self._duties.mark_done(epoch, (what, inference_id))
            return
        if self._deadline(epoch, inference_id, dispute) is None:
            return  # its dispute was resolved or pruned meanwhile: the ledger takes no vote now
        state = self._live()
        if isinstance(verdict, Unreachable):
            if not (verdict.witnessed and accuse_unreachable(state.height, deadline)):
                log.info("evidence of %s unreachable at %s%s: asking again", inference_id.hex()[:12], verdict.holders,
                         "" if verdict.witnessed else " while this node's own links are suspect")
                self._ask_again[(epoch, (what, inference_id))] = state.height + RETRY_AFTER_BLOCKS
                return
            verdict = withheld_verdict()
        self._ask_again.pop((epoch, (what, inference_id)), None)
        self.checked += 1
        proof = b"" if verdict.valid else self.seed(epoch)  # a failing check shows it was a duty

        def build(s: int) -> bytes:
            if dispute:
                return seal(DisputeVote(chain_id=self._chain_id, inference_id=inference_id, verdict=verdict,
                                        sequence=s), self._key)
            return seal(Validation(chain_id=self._chain_id, inference_id=inference_id, verdict=verdict,
                                   seed=proof, sequence=s), self._key)

        self._duties.once(epoch, (what, inference_id), build)

    def _deadline(self, epoch: int, inference_id: bytes, dispute: bool) -> int | None:
        """The last height whose block takes this check, or this vote (None: no open dispute)."""
        state = self._live()
        if not dispute:
            return validation_deadline(epoch, state.params)
        open_dispute = state.dispute(inference_id)
        return open_dispute.deadline if open_dispute and open_dispute.outcome is DisputeOutcome.OPEN else None

    async def judge(self, inference_id: bytes, record: Inference, give_up_at: int | None = None
                    ) -> VerdictStats | Unreachable | None:
        """Fetch, re-run and judge one inference by the client's signed request; evidence not
        served by the time ``give_up_at`` commits is ``Unreachable``.

        Total over what others serve: missing, malformed or inconsistent evidence, terms
        other than the request's, ids the model cannot run -- each ends as a failed verdict
        naming why, never as an exception (this runs inside the node, and one crafted
        artifact must not stop every validator that checks it, again after each restart).
        None when the fault is *this node's*: no engine or thresholds for the model, a context
        cap of its own below what the evidence needs (``_claim``), or its engine failing on
        evidence the model's limits accept (out of memory, a crash); it accuses no one, and its
        skipped duty is its own loss."""
        engine = self._engines.get(record.model)
        try:
            thresholds = self._params.for_model(record.model)
        except KeyError as e:
            log.error("cannot check %s: %s", inference_id.hex()[:12], e)
            return None
        if engine is None:
            log.warning("cannot check %s: this node does not run %s", inference_id.hex()[:12], record.model)
            return None
        async with self._evidence.fetch(inference_id, record, give_up_at) as served:
            if served is None:
                return withheld_verdict()
            if isinstance(served, Unreachable):
                return served
            claim = self._claim(engine, inference_id, record, served)
            if claim is None or isinstance(claim, Verdict):
                return None if claim is None else verdict_stats(claim)
            artifact, contract = claim
            try:
                async with self._engine_turn:
                    verdict = (await check_in_engine(engine, artifact, contract, thresholds)).verdict
            except Exception:  # the evidence passed every check the model imposes: the fault is here
                log.exception("cannot check %s: this node failed to re-run it", inference_id.hex()[:12])
                return None
            return verdict_stats(verdict)

    @staticmethod
    def _claim(engine: Engine, inference_id: bytes, record: Inference,
               served: Evidence) -> tuple[InferenceArtifact, Contract] | Verdict | None:
        """The served artifact and the contract it is judged by, or the failed verdict when
        the evidence cannot even be run: it does not decode, the request is one no honest
        executor could have run, or its ids are outside what the model accepts.

        Runnable means by the *model's* context (``model_context``), not this node's cap
        (``max_context``, lowered by its operator's ``max_model_len``, which genesis does not
        pin): an executor running the model uncapped serves a longer request honestly, and
        failing it would make every capped validator accuse honest work. Evidence that fits
        the model but not this node's cap is None: this node cannot judge it."""
        request, local = served.request, engine.local_model
        try:
            artifact = InferenceArtifact.decode(served.artifact)
        except ArtifactError as e:
            return rejected(f"evidence: the committed artifact does not decode: {e}")
        try:
            params = sampling_params(request)
            prompt_ids = engine.encode_chat([(t.role, t.content) for t in request.messages])
            local.check_request(prompt_ids, params.max_tokens, context=local.model_context)  # the executor's rule
        except Exception as e:  # noqa: BLE001 -- deterministic in the signed request: every validator, and
            # the executor that should have refused it, fails alike (a chat template raises what it likes)
            return rejected(f"contract: the request cannot be run: {e}")
        unscorable = check_scorable(prompt_ids, artifact.completion_ids, local.vocab_size, local.model_context)
        if unscorable is not None:
            return rejected(unscorable)
        if check_scorable(prompt_ids, artifact.completion_ids, local.vocab_size, local.max_context) is not None:
            log.warning("cannot check %s: %d prompt + %d completion tokens exceed this node's context cap "
                        "of %d (max_model_len)", inference_id.hex()[:12], len(prompt_ids),
                        len(artifact.completion_ids), local.max_context)
            return None
        return artifact, Contract(
            model=request.model, prompt_ids=tuple(prompt_ids), params=params, seed=inference_id,
            billed=Billed(record.response_hash, record.prompt_tokens, record.completion_tokens))
