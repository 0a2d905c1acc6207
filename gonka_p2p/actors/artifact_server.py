"""Artifacts kept for validators, and the protocol that serves them.

An inference's artifact (prompt ids, per-token evidence, parameters, seed)
is the evidence a validator re-checks; the ledger holds only its hash
commitment. Two parties keep the bytes until the epoch settles: the
executor that produced them and the TA that relayed them (rebuilt from the
executor's signed frames, so an executor that goes silent after its work
does not make that work unverifiable). Both put them into one node-wide
:class:`ArtifactStore`, served over ``/gonka/artifact/1``: a signed
:class:`ArtifactQuery` in, a signed :class:`ArtifactReply` (the client's
signed request and the artifact bytes) or ``InferenceFailed`` out. The
validator checks what it gets against the ledger's commitment, so a server
can withhold evidence but never forge it.
"""

from __future__ import annotations

from collections import OrderedDict

from gonka_p2p.gossip.service import NetworkService, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import ArtifactQuery, ArtifactReply, InferenceFailed
from gonka_p2p.wire.protocols import ARTIFACT_PROTOCOL
from gonka_p2p.wire.schema import WireError


class ArtifactStore:
    """(client request, encoded artifact) by inference id; bounded, oldest evicted first.

    The capacity stands in for "until the epoch settles": at 10,000 inferences it
    holds a devnet epoch many times over; a production node sizes it to its
    epoch's traffic."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._items: OrderedDict[bytes, tuple[bytes, bytes]] = OrderedDict()
        self._capacity = capacity

    def put(self, inference_id: bytes, request: bytes, artifact: InferenceArtifact) -> None:
        self._items[inference_id] = (request, artifact.encode())
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def get(self, inference_id: bytes) -> tuple[bytes, bytes] | None:
        return self._items.get(inference_id)

    def discard(self, inference_id: bytes) -> None:
        self._items.pop(inference_id, None)

    def __len__(self) -> int:
        return len(self._items)


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
        stored = self.store.get(query.message.inference_id)
        if stored is None:
            await send(self._fail("not_found", "no artifact for that inference id"))
            return
        request, artifact = stored
        await send(seal(ArtifactReply(request=request, artifact=artifact), self._key))

    def _fail(self, code: str, message: str) -> bytes:
        return seal(InferenceFailed(code=code, message=message), self._key)
