"""What the hostile-evidence and request-contract attack tests share: a client's signed request,
the evidence an executor serves for it, the ledger's record of it, and a validator that fetches
that evidence from a stand-in network and judges it with the tiny model (``ValidatorActor.judge``,
the validator's whole check path).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

from gonka_p2p.actors.validator import ValidatorActor
from gonka_p2p.adversary import cheats
from gonka_p2p.gossip.service import PeerUnreachable
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.inference.verification_params import load_verification_params
from gonka_p2p.ledger.transactions import VerdictStats
from gonka_p2p.wire.envelope import open_envelope, seal
from gonka_p2p.wire.messages import (
    NONCE_BYTES,
    ArtifactReply,
    ChatTurn,
    InferenceFailed,
    InferenceRequest,
    inference_id,
    response_hash,
)

CHAIN = "gonka-adversarial"
CLIENT, EXECUTOR, TA, VALIDATOR = (Keypair.from_seed(n) for n in (b"client", b"executor", b"ta", b"validator"))
QUESTION = "Write a short story about a robot who learns to paint."


def signed_request(model: str, params: SamplingParams | SimpleNamespace, messages: list[tuple[str, str]] | None = None,
                   nonce: bytes = b"n" * NONCE_BYTES) -> bytes:
    """The client's signed request for ``params`` (the contract the executor must honour)."""
    return seal(InferenceRequest(
        chain_id=CHAIN, model=model,
        messages=[ChatTurn(role=r, content=c) for r, c in (messages or [("user", QUESTION)])],
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, logprobs_k=params.logprobs_k, timestamp_ms=0, nonce=nonce), CLIENT)


def id_of(request: bytes) -> bytes:
    return inference_id(open_envelope(request, InferenceRequest))


def prompt_of(engine: Engine, request: bytes) -> list[int]:
    return engine.encode_chat([(t.role, t.content) for t in open_envelope(request, InferenceRequest).message.messages])


@dataclass(frozen=True)
class Served:
    """One inference as a validator finds it: the request and artifact bytes the executor
    serves, and what the ledger recorded from its Finish (counts, response, commitment)."""

    request: bytes
    artifact: bytes
    prompt_tokens: int
    completion_tokens: int
    response: bytes

    @classmethod
    def honestly(cls, request: bytes, artifact: InferenceArtifact) -> Served:
        """What an honest executor serves and claims for ``artifact``."""
        return cls(request, artifact.encode(), len(artifact.prompt_ids), len(artifact.steps),
                   response_hash(artifact.completion_ids))

    def with_artifact(self, artifact: InferenceArtifact | bytes) -> Served:
        """The same request, another artifact, claimed consistently with it where it decodes."""
        if isinstance(artifact, bytes):
            return replace(self, artifact=artifact)
        return self.honestly(self.request, artifact)

    def record(self, model: str) -> SimpleNamespace:
        """The ledger's Inference record: the fields a validator reads."""
        return SimpleNamespace(
            model=model, executor=EXECUTOR.peer_id, ta=TA.peer_id, artifact_commitment=digest(self.artifact),
            response_hash=self.response, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens)


class Holders:
    """The network as the validator sees it: the executor serves ``served``; the TA answers
    that it has nothing, as one does that did not keep it."""

    def __init__(self, served: Served) -> None:
        self.reply = seal(ArtifactReply(request=served.request, artifact=served.artifact), EXECUTOR)

    async def request(self, peer: str, protocol: str, data: bytes, timeout: float | None = None) -> bytes:
        if peer == TA.peer_id:
            return seal(InferenceFailed(code="not_found", message="no artifact for that inference id"), TA)
        if peer != EXECUTOR.peer_id:
            raise PeerUnreachable(f"{peer} is not on this network")
        return self.reply


def validator(engine: Engine, served: Served, engines: dict[str, Engine] | None = None) -> ValidatorActor:
    return ValidatorActor(Holders(served), VALIDATOR,  # type: ignore[arg-type]
                          {engine.model_name: engine} if engines is None else engines,
                          load_verification_params(), CHAIN, None)  # type: ignore[arg-type]


async def judge(engine: Engine, served: Served, engines: dict[str, Engine] | None = None) -> VerdictStats | None:
    """The validator's whole check path on ``served``: fetch, decode, score, verify."""
    return await validator(engine, served, engines).judge(id_of(served.request), served.record(engine.model_name))


async def honest_work(engine: Engine, params: SamplingParams, messages: list[tuple[str, str]] | None = None
                      ) -> Served:
    """What an honest executor serves for a request of ``params``."""
    request = signed_request(engine.model_name, params, messages)
    artifact = await cheats.honest(engine)(prompt_of(engine, request), params, id_of(request))
    return Served.honestly(request, artifact)
