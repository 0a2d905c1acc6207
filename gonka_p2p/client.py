"""The client library: sign a request, send it to a TA, stream the verified answer.

A client is not a participant: it holds a key (and, with the ledger, a
balance), dials one participant's TA and streams. It trusts nobody: every
frame must be signed by the executor that started the stream, refer to this
request's inference id, continue the token positions without gaps, and the
final response hash must match the tokens received -- so a TA that alters
the output, or an executor that changes its story, is caught here.

Use::

    async with await GonkaClient.connect("/ip4/127.0.0.1/tcp/9000/p2p/16Uiu2...") as client:
        async for event in client.stream_chat([("user", "Hi!")], max_tokens=64):
            if isinstance(event, TokensEvent):
                print(event.text, end="")
        print((await client.balance()).balance)   # the ledger, as the node's replica sees it

Which network: a request signs its chain id, and is good on that network
only. A client given ``chain_id`` signs for it (a pin: a TA of another
network refuses its requests with ``wrong_chain`` and nothing is charged
there); without one it signs for the chain id the TA states in its signed
:class:`NetworkInfo`, asked once. The pin matters to a key funded on several
networks: a lying TA could otherwise have it sign for, and be charged on,
another one. The CLI and the demo pin the genesis's chain id.

A broken relay does not lose a paid answer. A stream that breaks -- the TA
reset it, died, went silent, or a partition cut it -- is recovered: the client
asks the ledger (through the executor's node, else the TA) how the inference
stands; it dials the executor first, at the addresses its signed
``InferenceStarted`` names, since a client that talks only to its TA may never
have met it (testnet run 17 lost an answer to a throttled TA so). Before the
first frame the client does not know whether an executor started, so a ledger
that has had no such inference for ``UNSTARTED_GRACE_S`` ends the wait (the
break is raised as it was), while a TA that cannot be asked is asked again
until ``recovery_timeout``: it may have started one and be cut off by a
partition that will heal. Once the inference's Finish has settled (the client
is charged) the client fetches the answer over ``/gonka/answer/1`` from the
executor, else the TA, both of which keep the executor's signed frames until
the epoch settles and the request has left the ledger's replay window
(``actors/answer_server.py``). The recovered frames pass the same checks as a
live stream, and more: the same executor, the ledger's response hash, no more
frames than ``max_tokens`` allows, and the tokens already yielded as their
prefix; only the rest is yielded. It retries until the answer comes, the
ledger says the inference expired (:class:`AnswerExpired`: the escrow was
refunded), or ``recovery_timeout`` passes. Where no node has a ledger nobody
is charged, and the break is raised as it was.

A signed failure after the executor started is not a broken stream: the TA
says its relay to the executor broke or went silent (``executor_failed``,
``executor_stalled``), or the executor says it failed. That is raised at once
(a killed executor's client should not wait for the ledger to expire its
request), as :class:`AnswerInDoubt`: the executor may still have finished
-- a partition cut the TA from it while it went on, claimed the work, and
the ledger charged the client once the partition healed. The caller that
wants that answer passes the error to :meth:`GonkaClient.recover`, which runs
the same recovery as a broken stream (``AnswerExpired`` when the ledger
refunded instead).

The ledger calls (:meth:`GonkaClient.status`, :meth:`~GonkaClient.balance`,
:meth:`~GonkaClient.inference`, :meth:`~GonkaClient.app_hash`,
:meth:`~GonkaClient.submit_tx`) ask the node's replica over
``/gonka/ledger/query/1``; a node started without a genesis has no ledger
and says so.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from gonka_p2p.gossip.service import NetworkError, NetworkService, StreamReset, connect_any
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.model_names import DEFAULT_MODEL
from gonka_p2p.ledger.query import (
    AppHashQuery,
    AppHashReply,
    BalanceQuery,
    BalanceReply,
    EpochSummaryQuery,
    EpochSummaryReply,
    InferenceQuery,
    InferenceReply,
    QueryFailed,
    StatusQuery,
    StatusReply,
    SubmitReply,
    SubmitTx,
)
from gonka_p2p.wire.envelope import Signed, open_envelope, seal
from gonka_p2p.wire.messages import (
    NONCE_BYTES,
    AnswerQuery,
    ChatTurn,
    InferenceRequest,
    NetworkInfo,
    inference_id,
)
from gonka_p2p.wire.protocols import ANSWER_PROTOCOL, INFER_PROTOCOL, INFO_PROTOCOL, QUERY_PROTOCOL
from gonka_p2p.wire.schema import Message, WireError
from gonka_p2p.wire.stream import (
    GonkaError,
    ProtocolViolation,
    RequestRejected,
    FinishedEvent,
    StartedEvent,
    StreamEvent,
    StreamVerifier,
    TokensEvent,
)
from gonka_p2p.wire.unsigned import decode_frame_of, encode_frame


class NetworkUnavailable(GonkaError):
    code = "unreachable"


class StreamStalled(NetworkUnavailable):
    """The TA sent nothing for the stream's idle timeout; the stream was cancelled. A TA
    reports a stalled executor itself (``executor_stalled``): this is a silent TA, so a
    kind of unreachable one (callers that re-dial those re-dial this too)."""

    code = "stalled"


class NoLedger(NetworkUnavailable):
    """The node serves no ledger queries: it runs without a genesis."""


class AnswerExpired(GonkaError):
    """The stream broke and the ledger expired the inference unfinished: its escrow went back
    to the client, so nothing was charged for the answer that never came."""

    code = "expired"


class AnswerInDoubt(RequestRejected):
    """A signed failure after the executor started (see the module doc): the answer may still
    settle on the ledger. ``code`` and the message are the failure's; :meth:`GonkaClient.recover`
    fetches the rest of the answer if the ledger settles it."""

    def __init__(self, failure: RequestRejected, request: Signed[InferenceRequest],
                 streamed: StreamVerifier) -> None:
        super().__init__(str(failure), code=failure.code)
        self.request = request
        self.streamed = streamed  # what the stream verified before the failure

    @property
    def inference_id(self) -> bytes:
        return self.streamed.inference_id


RECOVERY_TIMEOUT_S = 120.0  # how long a broken stream's answer is sought before giving up
# A stream that broke before its first frame is given up once a ledger has had no such inference
# this long: a TA's Start commits within a few blocks of the executor starting.
UNSTARTED_GRACE_S = 15.0
_RETRY_S = (0.25, 5.0)  # first and longest pause between recovery rounds
_DIAL_TIMEOUT_S = 5.0  # one dial of a recovering client to one of the executor's addresses


@dataclass
class Completion:
    """A finished answer with the timings people compare."""

    text: str
    executor: str
    inference_id: bytes
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ttft_s: float = 0.0
    elapsed_s: float = 0.0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        decode = self.elapsed_s - self.ttft_s
        return (self.completion_tokens - 1) / decode if decode > 0 and self.completion_tokens > 1 else 0.0


def build_request(
    key: Keypair,
    messages: list[tuple[str, str]],
    chain_id: str,
    model: str = DEFAULT_MODEL,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    logprobs_k: int = 5,
) -> bytes:
    """A signed InferenceRequest envelope for network ``chain_id`` (fresh nonce, current time)."""
    return seal(InferenceRequest(
        chain_id=chain_id, model=model, messages=[ChatTurn(role=r, content=c) for r, c in messages],
        max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=top_k,
        logprobs_k=logprobs_k, timestamp_ms=int(time.time() * 1000), nonce=os.urandom(NONCE_BYTES),
    ), key)


class GonkaClient:
    def __init__(self, key: Keypair, service: NetworkService, ta: str, owns_service: bool = False,
                 chain_id: str | None = None,
                 ledger: Callable[[bytes], InferenceReply | None] | None = None) -> None:
        """``chain_id`` pins the network requests are signed for; None: the TA's (see module doc).
        ``ledger``: a committed ledger in this process (a node's own: the OpenAI gateway recovers
        for its HTTP clients so), which recovery reads instead of asking nodes; it returns None
        where the process has no ledger."""
        self.key = key
        self.service = service
        self.ta = ta
        self._owns_service = owns_service
        self._chain_id = chain_id
        self._local_ledger = ledger

    @classmethod
    async def connect(cls, bootstrap: str, key: Keypair | None = None,
                      listen: str = "/ip4/127.0.0.1/tcp/0", chain_id: str | None = None) -> GonkaClient:
        """Start a libp2p host for this client and dial the TA at ``bootstrap``."""
        from gonka_p2p.gossip.libp2p_service import Libp2pService

        key = key or Keypair.generate()
        service = Libp2pService(key, listen)
        await service.start()
        try:
            ta = await service.connect(bootstrap)
        except NetworkError as e:
            await service.stop()
            raise NetworkUnavailable(f"cannot reach the bootstrap peer {bootstrap}: {e}") from None
        return cls(key, service, ta, owns_service=True, chain_id=chain_id)

    async def close(self) -> None:
        if self._owns_service:
            await self.service.stop()

    async def __aenter__(self) -> GonkaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def network_info(self) -> dict[str, list[str]]:
        """Live executors the TA knows, with the models each serves."""
        info = await self._network_info()
        return dict(zip(info.executors, info.executor_models))

    async def chain_id(self) -> str:
        """The network this client signs requests for: the pinned one, else the TA's (asked once)."""
        if self._chain_id is None:
            self._chain_id = (await self._network_info()).chain_id
        return self._chain_id

    async def _network_info(self) -> NetworkInfo:
        try:
            frame = await self.service.request(self.ta, INFO_PROTOCOL, b"", timeout=10.0)
            return open_envelope(frame, NetworkInfo).message
        except (NetworkError, TimeoutError) as e:
            raise NetworkUnavailable(f"TA {self.ta} did not answer: {e}") from None
        except WireError as e:
            raise ProtocolViolation(f"TA sent a bad info frame: {e}") from None

    async def status(self, prover: str | None = None) -> StatusReply:
        """The node's view of the ledger: chain, height, epoch, app hash, participants, the
        proof-of-compute schedule, and ``prover``'s last proof-of-compute result (the asked
        node's own by default)."""
        return await self._query(StatusQuery(prover=prover or self.ta), StatusReply)  # type: ignore[return-value]

    async def balance(self, account: str | None = None) -> BalanceReply:
        """``account``'s committed balance and sequence (this client's own by default)."""
        return await self._query(BalanceQuery(account=account or self.key.peer_id), BalanceReply)  # type: ignore[return-value]

    async def inference(self, inference_id: bytes) -> InferenceReply:
        """The ledger's record of an inference (``Completion.inference_id``): status, escrow, cost."""
        return await self._query(InferenceQuery(inference_id=inference_id), InferenceReply)  # type: ignore[return-value]

    async def epoch_summary(self, epoch: int) -> EpochSummaryReply:
        """How ``epoch`` settled (``settled`` is False until it has): paid, caught, refunded."""
        return await self._query(EpochSummaryQuery(epoch=epoch), EpochSummaryReply)  # type: ignore[return-value]

    async def app_hash(self, height: int) -> bytes | None:
        """The node's app hash after ``height`` (None if it has not reached it, or forgot it)."""
        reply: AppHashReply = await self._query(AppHashQuery(height=height), AppHashReply)  # type: ignore[assignment]
        return reply.app_hash if reply.found else None

    async def submit_tx(self, raw: bytes) -> bytes:
        """Hand a signed transaction to the node's mempool; its hash, or RequestRejected with the reason."""
        reply: SubmitReply = await self._query(SubmitTx(tx=raw), SubmitReply)  # type: ignore[assignment]
        if reply.code != "ok":
            raise RequestRejected(reply.detail, code=reply.code)
        return reply.tx_hash

    async def _query(self, request: Message, reply_type: type[Message], node: str | None = None) -> Message:
        node = node or self.ta
        try:
            frame = await self.service.request(node, QUERY_PROTOCOL, encode_frame(request), timeout=10.0)
            reply = decode_frame_of(frame, reply_type, QueryFailed)
        except StreamReset as e:
            raise NoLedger(f"node {node} does not answer ledger queries (is it running "
                           f"with a genesis?): {e}") from None
        except (NetworkError, TimeoutError) as e:
            raise NetworkUnavailable(f"node {node} did not answer: {e}") from None
        except WireError as e:
            raise ProtocolViolation(f"node sent a bad ledger reply: {e}") from None
        if isinstance(reply, QueryFailed):
            raise RequestRejected(reply.message, code=reply.code)
        return reply

    async def stream_chat(
        self, messages: list[tuple[str, str]], *, timeout: float = 120.0, **params: object
    ) -> AsyncIterator[StreamEvent]:
        """Send a chat request; yield verified events until the answer is complete (``timeout``:
        the idle timeout of :meth:`stream_request`)."""
        request = build_request(self.key, messages, await self.chain_id(), **params)  # type: ignore[arg-type]
        async for event in self.stream_request(request, timeout=timeout):
            yield event

    async def stream_request(self, request: bytes, timeout: float = 120.0,
                             recovery_timeout: float = RECOVERY_TIMEOUT_S) -> AsyncIterator[StreamEvent]:
        """Stream an already signed request envelope (lets callers keep the exact bytes).

        ``timeout`` is the idle timeout: a TA that sends no frame for that long (the first
        one included: it waits for an executor) has its stream cancelled, and StreamStalled
        is raised -- a frozen or withholding TA cannot hang the caller. A stream that breaks
        after the executor started is recovered for up to ``recovery_timeout`` seconds (see
        the module doc)."""
        signed = open_envelope(request, InferenceRequest)
        verifier = StreamVerifier(signed)
        broken: GonkaError
        try:
            async with aclosing(self.service.open_stream(self.ta, INFER_PROTOCOL, request, timeout)) as live:
                async for frame in live:
                    try:
                        event = verifier.accept(frame)
                    except RequestRejected as failure:
                        if verifier.executor is None:
                            raise
                        raise AnswerInDoubt(failure, signed, verifier) from None
                    if event is not None:
                        yield event
                    if verifier.done:
                        return
            broken = ProtocolViolation("the TA closed the stream before the answer was complete")
        except TimeoutError:  # the transport's per-frame timeout; it reset the stream
            broken = StreamStalled(f"TA {self.ta} sent nothing for {timeout:g} s; the stream was cancelled")
        except NetworkError as e:
            broken = NetworkUnavailable(f"the stream from TA {self.ta} broke: {e}")
        # Nothing verified yet: whether an executor started is the ledger's to say (the 30-minute
        # testnet charged a client whose TA's circuit a partition cut before its first frame).
        for event in await self._recover(signed, verifier, broken, recovery_timeout):
            yield event

    async def recover(self, doubt: AnswerInDoubt, timeout: float = RECOVERY_TIMEOUT_S) -> list[StreamEvent]:
        """The rest of the answer ``doubt`` cut (the events after those its stream yielded), once
        the ledger settles it; raises AnswerExpired if the ledger refunded it instead, ``doubt``
        itself where no node has a ledger, NetworkUnavailable after ``timeout`` seconds."""
        return await self._recover(doubt.request, doubt.streamed, doubt, timeout)

    async def _recover(self, request: Signed[InferenceRequest], live: StreamVerifier, broken: GonkaError,
                       timeout: float) -> list[StreamEvent]:
        """The rest of the answer ``live`` verified so far, once the ledger settles it; raises
        AnswerExpired, ``broken`` where no node has a ledger (or, nothing verified yet, where
        the ledger has had no such inference for ``UNSTARTED_GRACE_S``), NetworkUnavailable
        at ``timeout``."""
        nodes = list(dict.fromkeys(node for node in (live.executor, self.ta) if node))
        loop = asyncio.get_running_loop()
        give_up, pause, why = loop.time() + timeout, _RETRY_S[0], str(broken)  # the dials count too
        if live.executor is not None:  # the TA may be what failed: ask the executor itself
            await self._reach(live.executor, live.executor_addrs, give_up)
        unknown_since: float | None = None  # when a ledger first said it has no such inference
        while True:
            try:
                record = await self._ledger_record(live.inference_id, nodes)
            except NoLedger:  # no ledger anywhere: nobody was charged
                raise broken from None
            if record is not None and not record.found:
                unknown_since = loop.time() if unknown_since is None else unknown_since
                if live.executor is None and loop.time() - unknown_since >= min(timeout, UNSTARTED_GRACE_S):
                    raise broken from None  # no Start: no executor ran, nothing was charged
                record = None
            if record is not None and record.status == "expired":
                raise AnswerExpired(f"{broken}; the inference expired unfinished on the ledger: "
                                    "its escrow was refunded") from None
            if record is not None and record.status == "settled":
                await self._reach(record.executor, record.executor_addrs, give_up)
                failures = []
                for node in dict.fromkeys((record.executor, *nodes)):
                    try:
                        events = await self.fetch_answer(request.raw, node, record)
                        return _after(events, live)
                    except (GonkaError, NetworkError, TimeoutError) as e:
                        failures.append(f"{node}: {e}")
                why = "; ".join(failures)
            else:
                why = f"the ledger has the inference {record.status if record else 'not yet'}"
            if loop.time() + pause > give_up:
                raise NetworkUnavailable(f"{broken}; the answer was not recovered within {timeout:g} s "
                                         f"(last: {why})") from None
            await asyncio.sleep(pause)
            pause = min(2 * pause, _RETRY_S[1])

    async def _reach(self, peer: str, addrs: list[str], give_up: float) -> None:
        """Dial ``peer`` at the first of ``addrs`` (its ledger record, or its InferenceStarted)
        that reaches it before the loop time ``give_up``, unless connected: a recovering client
        may never have met the executor (one that joined after the client connected; the
        30-minute testnet lost an answer so). The executor chose those addresses (up to 8): ones
        that never answer cost at most the time left. Only a connection that authenticates as
        ``peer`` counts; a failure is left to the fetch that follows to report."""
        if peer not in self.service.connected_peers():
            targets = (addr if addr.endswith(f"/p2p/{peer}") else f"{addr}/p2p/{peer}" for addr in addrs)
            await connect_any(self.service, targets, give_up, _DIAL_TIMEOUT_S)

    async def _ledger_record(self, iid: bytes, nodes: list[str]) -> InferenceReply | None:
        """The record of ``iid`` in the ledger of the first of ``nodes`` to answer (``found``
        false: it has none); None if none answered. NoLedger if each of them serves no ledger."""
        if self._local_ledger is not None:
            local = self._local_ledger(iid)
            if local is None:
                raise NoLedger("this node runs without a ledger")
            return local
        no_ledger = True
        for node in nodes:
            try:
                reply = await self._query(InferenceQuery(inference_id=iid), InferenceReply, node)
            except GonkaError as e:
                no_ledger = no_ledger and isinstance(e, NoLedger)
                continue
            assert isinstance(reply, InferenceReply)
            return reply
        if no_ledger:
            raise NoLedger(f"none of {', '.join(nodes)} serves a ledger")
        return None

    async def fetch_answer(self, request: bytes, node: str, record: InferenceReply | None = None
                           ) -> list[StreamEvent]:
        """This client's answer to its signed ``request``, as ``node`` (the executor, or the TA
        that relayed it) kept it, verified: the executor's signature on every frame, the
        positions, at most ``max_tokens`` tokens, and the final hash against the ledger's
        ``record`` (asked of ``node`` when not given). Raises RequestRejected (``not_found``:
        not kept there), ProtocolViolation, or NetworkError."""
        signed = open_envelope(request, InferenceRequest)
        iid = inference_id(signed)
        if record is None:
            asked = await self._query(InferenceQuery(inference_id=iid), InferenceReply, node)
            assert isinstance(asked, InferenceReply)
            record = asked
        if not record.found or not record.response_hash:
            raise RequestRejected(f"the ledger holds no finished inference {iid.hex()}", code="not_found")
        query = seal(AnswerQuery(inference_id=iid, reader=self.service.peer_id,
                                 timestamp_ms=int(time.time() * 1000)), self.key)
        verifier = StreamVerifier(signed)
        events: list[StreamEvent] = []
        frames_left = signed.message.max_tokens + 2  # InferenceStarted, >= 1 token per batch, the end
        async with aclosing(self.service.open_stream(node, ANSWER_PROTOCOL, query, timeout=10.0)) as frames:
            async for frame in frames:
                frames_left -= 1
                if frames_left < 0:
                    raise ProtocolViolation(f"{node} sent more frames than max_tokens allows")
                event = verifier.accept(frame)
                if event is not None:
                    events.append(event)
                if verifier.done:
                    break
        if not verifier.done:
            raise ProtocolViolation(f"{node} ended the answer before its last frame")
        finished = events[-1]
        assert isinstance(finished, FinishedEvent)
        if verifier.executor != record.executor or finished.response_hash != record.response_hash:
            raise ProtocolViolation(f"the answer {node} kept is not the one the ledger settled")
        return events

    async def chat(self, messages: list[tuple[str, str]],
                   on_text: Callable[[str], object] | None = None, **params: object) -> Completion:
        """The whole answer with its timings; ``on_text`` sees each text piece as it streams."""
        t0 = time.perf_counter()
        completion: Completion | None = None
        async for event in self.stream_chat(messages, **params):  # type: ignore[arg-type]
            if isinstance(event, StartedEvent):
                completion = Completion("", event.executor, event.inference_id, "",
                                        event.prompt_tokens)
            elif isinstance(event, TokensEvent):
                assert completion is not None
                if not completion.token_ids:
                    completion.ttft_s = time.perf_counter() - t0
                completion.text += event.text
                if on_text is not None:
                    on_text(event.text)
                completion.token_ids += event.token_ids
                completion.logprobs += event.logprobs
            else:
                assert completion is not None
                completion.finish_reason = event.finish_reason
        assert completion is not None
        completion.elapsed_s = time.perf_counter() - t0
        return completion


def _after(events: list[StreamEvent], live: StreamVerifier) -> list[StreamEvent]:
    """The recovered ``events`` past what the ``live`` stream already yielded. They must extend
    it: the same executor, its tokens as their prefix, a batch boundary where it broke. A stream
    that broke before its first frame yielded nothing: every event is new, Started included."""
    unstarted = live.executor is None
    if events and not unstarted and isinstance(events[0], StartedEvent) and events[0].executor != live.executor:
        raise ProtocolViolation("the recovered answer comes from another executor than the stream's")
    rest: list[StreamEvent] = []
    position, seen = 0, len(live.token_ids)
    for event in events:
        if isinstance(event, TokensEvent):
            end = position + len(event.token_ids)
            if position < seen and (end > seen or event.token_ids != live.token_ids[position:end]):
                raise ProtocolViolation("the recovered answer does not extend the tokens already streamed")
            if position >= seen:
                rest.append(event)
            position = end
        elif isinstance(event, FinishedEvent) or (unstarted and isinstance(event, StartedEvent)):
            rest.append(event)
    return rest
