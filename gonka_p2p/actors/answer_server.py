"""Answers kept for their clients, and the protocol that serves them (``/gonka/answer/1``).

A client is charged once the executor's ``FinishInference`` commits, whether or
not the relayed stream reached it: a TA killed, a stream reset or a
partition after the executor's last frame would leave it paying for an
answer it never read. So the executor, and the TA that relayed the stream,
keep the answer as the executor signed it (its response frames, verbatim) in
the node's :class:`~gonka_p2p.actors.artifact_store.ArtifactStore` until the
inference's epoch settles and its request has left the ledger's replay window
(the client may still be recovering it), and serve it here to the client that
asked for it.

Who may read: the query (:class:`~gonka_p2p.wire.messages.AnswerQuery`) must be
signed by the key that signed the request -- or by the TA the committed ledger
names for the inference, which relayed the answer anyway and fetches it for a
client that cannot fetch for itself (the OpenAI gateway's HTTP clients hold no
libp2p host; ``openai/gateway.py``) -- name the stream's opener as its
reader (libp2p authenticates the opener, so a third party replaying an
overheard query opens the stream as itself and is refused) and be fresh
(:data:`QUERY_WINDOW_MS` either way of this node's clock). Whatever fails,
the reply is one ``InferenceFailed``: ``not_found`` alike for an answer not
kept and one kept for another client, so a query tells a stranger nothing.
The frames themselves carry the executor's signatures; the client checks
them, their positions and the final hash against the ledger
(``client.py``), so a server can withhold an answer but never forge one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gonka_p2p.actors.artifact_store import ArtifactStore
from gonka_p2p.gossip.service import NetworkService, SendFrame
from gonka_p2p.identity import Keypair
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import AnswerQuery, InferenceFailed, InferenceRequest
from gonka_p2p.wire.protocols import ANSWER_PROTOCOL
from gonka_p2p.wire.schema import WireError

QUERY_WINDOW_MS = 120_000  # a query's timestamp may differ from this node's clock by this much


class AnswerServer:
    """Serves the answers in ``store`` to the clients that signed their requests."""

    def __init__(self, service: NetworkService, key: Keypair, store: ArtifactStore,
                 clock: Callable[[], float] = time.time,
                 relayed_by: Callable[[bytes], str | None] = lambda inference_id: None) -> None:
        """``relayed_by``: the TA the committed ledger names for an inference (None: unknown)."""
        self._service = service
        self._key = key
        self._store = store
        self._clock = clock
        self._relayed_by = relayed_by

    def start(self) -> None:
        self._service.set_stream_handler(ANSWER_PROTOCOL, self._serve)

    async def _serve(self, opener: str, frame: bytes, send: SendFrame) -> None:
        try:
            query = open_envelope(frame, AnswerQuery)
        except WireError as e:
            await send(self._fail(e.code, f"bad answer query: {e}"))
            return
        if query.message.reader != opener:
            await send(self._fail("bad_signature", "the query names another reader than its sender"))
            return
        if abs(query.message.timestamp_ms - int(self._clock() * 1000)) > QUERY_WINDOW_MS:
            await send(self._fail("stale", f"the query's timestamp is over {QUERY_WINDOW_MS} ms "
                                           "from this node's clock"))
            return
        iid = query.message.inference_id
        kept = await self._store.answer(iid)
        if kept is None or not (query.signer == open_envelope(kept[0], InferenceRequest).signer
                                or query.signer_id == self._relayed_by(iid)):
            await send(self._fail("not_found", "no answer kept here for that inference and client"))
            return
        for answer_frame in kept[1]:
            await send(answer_frame)

    def _fail(self, code: str, message: str) -> bytes:
        return seal(InferenceFailed(code=code, message=message), self._key)
