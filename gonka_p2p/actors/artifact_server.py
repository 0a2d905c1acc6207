"""Artifacts kept for validators, and the protocol that serves them.

An inference's artifact (prompt ids, per-token evidence, parameters, seed)
is the evidence a validator re-checks; the ledger holds only its hash
commitment. Two parties keep the bytes until the epoch settles: the
executor that produced them and the TA that relayed them (rebuilt from the
executor's signed frames, so an executor that goes silent after its work
does not make that work unverifiable). Both put them into one node-wide
:class:`~gonka_p2p.actors.artifact_store.ArtifactStore` (on disk until the
inference's epoch settles), served over ``/gonka/artifact/1``: a signed
:class:`ArtifactQuery` in, a signed :class:`ArtifactReply` (the client's
signed request and the artifact bytes) or ``InferenceFailed`` out. The
validator checks what it gets against the ledger's commitment, so a server
can withhold evidence but never forge it.

Who may read (:func:`may_read_evidence`): the artifact's completion ids are the
client's answer, and inference ids are public on the ledger, so serving every
asker would hand any peer every client's answer -- which ``AnswerServer``
refuses to strangers. The evidence goes only to whom it is for: the peers
holding voting power in an epoch the committed ledger still keeps (the
inference's validators and its dispute committees are drawn from those), the
inference's executor and TA, and the client that signed the request. The
query must be signed by the stream's opener (libp2p authenticates it), so an
overheard query is worth nothing to whoever replays it. Any other asker gets
``forbidden``: a validator that this node's replica does not know as one yet
(it lags behind the block that made it one) asks again later, as it would a
holder it did not reach (``evidence_fetch``), instead of judging the evidence
withheld.
"""

from __future__ import annotations

from collections.abc import Callable

from gonka_p2p.actors.artifact_store import ArtifactStore
from gonka_p2p.gossip.service import NetworkService, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ArtifactQuery, ArtifactReply, InferenceFailed, InferenceRequest
from gonka_p2p.wire.protocols import ARTIFACT_PROTOCOL
from gonka_p2p.wire.schema import WireError

FORBIDDEN = "forbidden"  # the code of a refused reader: it may be one this node does not know as such yet


def may_read_evidence(ledger: LedgerState | None, inference_id: bytes, client: str, reader: str) -> bool:
    """May ``reader`` read the evidence of ``inference_id``, whose request ``client`` signed?
    The client, its answer's owner; with a committed ledger, also the inference's executor and
    TA, and any peer holding voting power in an epoch the ledger still keeps -- the inference's
    validators and dispute committees among them, and nobody else: the evidence is the answer.
    Without a ledger nobody validates, so the client alone."""
    if reader == client:
        return True
    if ledger is None:
        return False
    record = ledger.inference(inference_id)
    if record is not None and reader in (record.executor, record.ta):
        return True
    return any(info.weights.get(reader, 0) > 0 for info in ledger.epochs.rows.values())


class ArtifactServer:
    """Answers artifact queries from ``store`` over ``/gonka/artifact/1``, to the readers
    :func:`may_read_evidence` allows."""

    def __init__(self, service: NetworkService, key: Keypair, store: ArtifactStore,
                 ledger: Callable[[], LedgerState | None] = lambda: None) -> None:
        """``ledger``: the replica's committed state now (None: this node keeps no ledger)."""
        self._service = service
        self._key = key
        self.store = store
        self.ledger = ledger

    def start(self) -> None:
        self._service.set_stream_handler(ARTIFACT_PROTOCOL, self._serve)

    async def _serve(self, opener: str, frame: bytes, send: SendFrame) -> None:
        try:
            query = open_envelope(frame, ArtifactQuery)
        except WireError as e:
            await send(self._fail(e.code, f"bad artifact query: {e}"))
            return
        if query.signer_id != opener:
            await send(self._fail("bad_signature", "the query is signed by another key than its sender's"))
            return
        iid = query.message.inference_id
        stored = await self.store.get(iid)
        if stored is None:
            await send(self._fail("not_found", "no artifact for that inference id"))
            return
        request, artifact = stored
        client = open_envelope(request, InferenceRequest).signer_id
        if not may_read_evidence(self.ledger(), iid, client, opener):
            await send(self._fail(FORBIDDEN, "this node serves evidence to its inference's parties and to "
                                             "validators only"))
            return
        await send(seal(ArtifactReply(request=request, artifact=artifact), self._key))

    def _fail(self, code: str, message: str) -> bytes:
        return seal(InferenceFailed(code=code, message=message), self._key)
