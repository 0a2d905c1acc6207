"""Attack class: one client signature charged many times, or on another network.

The inference id used to be the SHA-256 of the client's whole envelope, and the
request named no network: anyone reading ``StartInference`` in a block could
start the same signed bytes on any other chain, and every distinct envelope of
one request was a distinct inference. Now the request signs its chain id and
the id is derived from what the client signed -- (chain, client key, nonce) --
so one signed nonce is one inference on one network, however its bytes travel.
"""

from __future__ import annotations

import time

import msgpack
import pytest

from gonka_p2p.actors.admission import Rejected
from gonka_p2p.actors.directory import PeerDirectory
from gonka_p2p.actors.transfer_agent import TransferAgent
from gonka_p2p.gossip.memory import MemoryHub
from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.block import Block, Receipt
from gonka_p2p.ledger.genesis import Genesis, GenesisParticipant, Params
from gonka_p2p.ledger.state import LedgerState, apply_block
from gonka_p2p.ledger.transactions import Reason, StartInference
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import NONCE_BYTES, ChatTurn, InferenceRequest, inference_id
from gonka_p2p.wire.schema import WireError

CHAIN = "gonka-identity"
MODEL = "m"
T0 = int(time.time() * 1000)
CLIENT, TA, EX = (Keypair.from_seed(name) for name in (b"client", b"ta", b"ex"))
BALANCE = 1_000_000


def ledger() -> LedgerState:
    return LedgerState.from_genesis(Genesis(
        chain_id=CHAIN, genesis_time_ms=T0, params=Params(price_per_token={MODEL: 1}),
        participants=(GenesisParticipant(TA.public_key, 10),
                      GenesisParticipant(EX.public_key, 10, models=(MODEL,))),
        allocations={CLIENT.peer_id: BALANCE}))


def request(content: str = "hi", chain: str = CHAIN, nonce: bytes = b"n" * NONCE_BYTES,
            client: Keypair = CLIENT) -> bytes:
    return seal(InferenceRequest(
        chain_id=chain, model=MODEL, messages=[ChatTurn(role="user", content=content)], max_tokens=8,
        temperature=1.0, top_p=1.0, top_k=0, logprobs_k=5, timestamp_ms=T0, nonce=nonce), client)


def start(state: LedgerState, *requests: bytes) -> list[Receipt]:
    """One block in which the TA starts each request, in order."""
    txs = [seal(StartInference(chain_id=CHAIN, request=r, executor=EX.peer_id, attempt=0, sequence=i), TA)
           for i, r in enumerate(requests)]
    _, receipts = apply_block(state, Block(state.height + 1, state.last_block_hash, TA.peer_id,
                                           state.time_ms + 1000, txs))  # type: ignore[arg-type]
    return receipts


def test_one_signed_nonce_is_one_inference_whatever_else_the_client_signed() -> None:
    first, second = request("question one"), request("question two")
    assert first != second
    assert inference_id(open_envelope(first, InferenceRequest)) == inference_id(
        open_envelope(second, InferenceRequest))
    state = ledger()
    receipts = start(state, first, second)
    assert [r.reason for r in receipts] == [Reason.OK, Reason.DUPLICATE_INFERENCE]
    assert len(state.inferences.rows) == 1  # escrowed, and charged, once


def test_the_id_is_the_signed_chain_client_and_nonce_not_the_envelope_bytes() -> None:
    ids = {inference_id(open_envelope(raw, InferenceRequest)) for raw in (
        request(), request(chain="other"), request(nonce=b"m" * NONCE_BYTES),
        request(client=Keypair.from_seed(b"another client")))}
    assert len(ids) == 4
    same = open_envelope(request(content="a different prompt"), InferenceRequest)
    assert inference_id(same) == inference_id(open_envelope(request(), InferenceRequest))


@pytest.mark.parametrize("nonce", [b"", b"short", b"n" * (NONCE_BYTES + 1)])
def test_a_nonce_is_exactly_nonce_bytes(nonce: bytes) -> None:
    body = open_envelope(request(), InferenceRequest).message.to_obj()
    with pytest.raises(WireError):
        InferenceRequest.decode(msgpack.packb({**body, "nonce": nonce}, use_bin_type=True))


def test_a_request_signed_for_another_network_does_not_start_here() -> None:
    state = ledger()
    (receipt,) = start(state, request(chain="gonka-elsewhere"))
    assert receipt.reason == Reason.REQUEST_WRONG_CHAIN
    assert state.balance(CLIENT.peer_id) == BALANCE and not state.inferences.rows


async def test_a_transfer_agent_refuses_a_request_for_another_network() -> None:
    hub = MemoryHub()
    service = hub.service(TA)
    await service.start()
    ta = TransferAgent(service, TA, PeerDirectory(service, TA, [], 1, None), chain_id=CHAIN)
    with pytest.raises(Rejected) as refused:
        await ta.admit(request(chain="gonka-elsewhere"))
    assert refused.value.code == "wrong_chain"
    await service.stop()
