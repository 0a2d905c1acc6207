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
"""

from __future__ import annotations

from gonka_p2p.actors.artifact_store import ArtifactStore
from gonka_p2p.gossip.service import NetworkService, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ArtifactQuery, ArtifactReply, InferenceFailed
from gonka_p2p.wire.protocols import ARTIFACT_PROTOCOL
from gonka_p2p.wire.schema import WireError


class ArtifactServer:
    """Answers artifact queries from ``store`` over ``/gonka/artifact/1``."""

    def __init__(self, service: NetworkService, key: Keypair, store: ArtifactStore) -> None:
        self._service = service
        self._key = key
        self.store = store

    def start(self) -> None:
        self._service.set_stream_handler(ARTIFACT_PROTOCOL, self._serve)

    async def _serve(self, opener: str, frame: bytes, send: SendFrame) -> None:
        try:
            query = open_envelope(frame, ArtifactQuery)
        except WireError as e:
            await send(self._fail(e.code, f"bad artifact query: {e}"))
            return
        stored = await self.store.get(query.message.inference_id)
        if stored is None:
            await send(self._fail("not_found", "no artifact for that inference id"))
            return
        request, artifact = stored
        await send(seal(ArtifactReply(request=request, artifact=artifact), self._key))

    def _fail(self, code: str, message: str) -> bytes:
        return seal(InferenceFailed(code=code, message=message), self._key)
