"""Attack class: hostile evidence against the validator's check path.

An executor (or the TA that relayed its work) serves validators the client's request and an
artifact. On main, an artifact committed with a non-integer prompt id raised ValueError out
of decoding, and one claiming an out-of-vocabulary token made scoring raise EngineError;
neither was caught in the validator's step, which ran in the node's TaskGroup, so every
validator that checked the inference died -- and again after each restart, since its duties
are recomputed from the ledger. Now whatever is served ends as a verdict on that inference
(failed, with the reason); only this node's own faults (no engine for the model, a context cap
of its own below what the evidence needs, an engine that fails on evidence the model accepts)
end as "cannot judge", which accuses no one.
"""

from __future__ import annotations

from types import SimpleNamespace

import asyncio
import math
import struct
from dataclasses import replace

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served_evidence import Served, honest_work, id_of, judge, prompt_of, signed_request, validator

from gonka_p2p.identity import digest
from gonka_p2p.inference.artifacts import MAX_TOKEN_ID, InferenceArtifact
from gonka_p2p.inference.engine import Engine, EngineError, ScoredCompletion
from gonka_p2p.inference.sampler import MIN_TEMPERATURE, SamplingParams
from gonka_p2p.ledger.transactions import FailureFlag, VerdictStats

SAMPLED = SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9)


@pytest.fixture(scope="module")
def honest(engine: Engine) -> Served:
    return asyncio.run(honest_work(engine, SAMPLED))


def failed_with(verdict: VerdictStats | None, flag: FailureFlag) -> bool:
    return verdict is not None and not verdict.valid and bool(verdict.failure_flags & flag)


def with_header(artifact: bytes, **changes: object) -> bytes:
    """``artifact`` with header fields replaced (by name), the rows untouched."""
    names = ["version", "model", "prompt", "max_tokens", "temp", "top_p", "top_k", "k", "seed", "n"]
    (hlen,) = struct.unpack_from("<I", artifact)
    header = dict(zip(names, msgpack.unpackb(artifact[4:4 + hlen], raw=False), strict=True)) | changes
    packed = msgpack.packb(list(header.values()), use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + artifact[4 + hlen:]


def decoded(served: Served) -> InferenceArtifact:
    return InferenceArtifact.decode(served.artifact)


async def test_honest_evidence_is_valid(engine: Engine, honest: Served) -> None:
    verdict = await judge(engine, honest)
    assert verdict is not None and verdict.valid, verdict


async def test_a_committed_artifact_that_does_not_decode_is_malformed_evidence(
        engine: Engine, honest: Served) -> None:
    crafted = honest.with_artifact(with_header(honest.artifact, prompt=[1, "two", 3]))
    assert failed_with(await judge(engine, crafted), FailureFlag.EVIDENCE)


async def test_an_out_of_vocabulary_token_is_a_failed_verdict_not_a_crash(engine: Engine, honest: Served) -> None:
    artifact = decoded(honest)
    steps = list(artifact.steps)
    steps[3] = replace(steps[3], token_id=engine.local_model.vocab_size + 7)
    verdict = await judge(engine, honest.with_artifact(replace(artifact, steps=tuple(steps))))
    assert failed_with(verdict, FailureFlag.EVIDENCE)


async def test_a_completion_past_the_models_context_is_a_failed_verdict(engine: Engine) -> None:
    context = engine.local_model.max_context
    asked = SamplingParams(max_tokens=context)
    request = signed_request(engine.model_name, asked)
    step = decoded(await honest_work(engine, SamplingParams(max_tokens=1))).steps[0]
    served = Served.honestly(request, InferenceArtifact(
        engine.model_name, (1, 2, 3), asked, b"", (step,) * context))
    verdict = await judge(engine, served)
    assert verdict is not None and not verdict.valid


async def test_evidence_nobody_serves_is_withheld(engine: Engine, honest: Served) -> None:
    record = honest.record(engine.model_name)
    record.artifact_commitment = digest(b"the bytes the executor committed to")  # and never serves
    verdict = await validator(engine, honest).judge(id_of(honest.request), record)
    assert failed_with(verdict, FailureFlag.WITHHELD)


class FailingEngine:
    """The tiny model, except that scoring fails for a reason of this node's own."""

    def __init__(self, engine: Engine, error: BaseException) -> None:
        self._engine, self._error = engine, error

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    async def score(self, prompt_ids: list[int], completion_ids: list[int], k: int,
                    with_logits: bool = False) -> ScoredCompletion:
        raise self._error


@pytest.mark.parametrize("error", [MemoryError(), EngineError("the engine is closed"), RuntimeError("CUDA")],
                         ids=repr)
async def test_this_nodes_own_faults_accuse_no_one(engine: Engine, honest: Served, error: BaseException) -> None:
    failing = FailingEngine(engine, error)
    assert await judge(engine, honest, engines={engine.model_name: failing}) is None  # type: ignore[dict-item]


async def test_a_model_this_node_does_not_run_accuses_no_one(engine: Engine, honest: Served) -> None:
    assert await judge(engine, honest, engines={}) is None


# ---------------------------------------------------------------------------
# Fuzz: hostile artifacts and requests through the whole check path


TOKEN = st.integers(0, MAX_TOKEN_ID)
PARAMS = st.builds(SamplingParams, max_tokens=st.integers(1, 64), temperature=st.sampled_from([0.0, 0.7, 1.0])
                   | st.floats(MIN_TEMPERATURE, 10.0), top_p=st.floats(0.01, 1.0), top_k=st.integers(0, 100_000),
                   logprobs_k=st.integers(5, 20))
# What the wire admits, which is more than a runnable request (e.g. 0 < T < MIN_TEMPERATURE).
WIRE_PARAMS = st.builds(SimpleNamespace, max_tokens=st.integers(1, 32768), temperature=st.floats(0.0, 10.0),
                        top_p=st.floats(0.01, 1.0), top_k=st.integers(0, 1_000_000), logprobs_k=st.integers(5, 20))
LOGPROB = st.floats(-1e30, 0.0) | st.just(-math.inf)  # float32 rows hold them without overflow


def mutate(data: st.DataObject, artifact: InferenceArtifact) -> InferenceArtifact:
    """One hostile change to an artifact that still encodes."""
    steps = list(artifact.steps)
    at = data.draw(st.integers(0, len(steps) - 1))
    k = artifact.params.logprobs_k
    change = data.draw(st.sampled_from(["token", "logprob", "top", "steps", "params", "prompt", "seed", "model"]))
    if change == "token":
        steps[at] = replace(steps[at], token_id=data.draw(TOKEN))
    elif change == "logprob":
        steps[at] = replace(steps[at], logprob=data.draw(LOGPROB),
                            top_logprobs=tuple(data.draw(st.lists(LOGPROB, min_size=k, max_size=k))))
    elif change == "top":
        steps[at] = replace(steps[at], top_ids=tuple(data.draw(st.lists(TOKEN, min_size=k, max_size=k))))
    elif change == "steps":
        steps = (steps * 3)[:data.draw(st.integers(0, 3 * len(steps)))]
    elif change == "params":  # keep the rows encodable: the stated k is the rows' k
        return replace(artifact, params=replace(data.draw(PARAMS), logprobs_k=k))
    elif change == "prompt":
        return replace(artifact, prompt_ids=tuple(data.draw(st.lists(TOKEN, max_size=40))))
    elif change == "seed":
        return replace(artifact, seed=data.draw(st.binary(max_size=64)))
    else:
        return replace(artifact, model=data.draw(st.text(max_size=20)))
    return replace(artifact, steps=tuple(steps))


def flip_bytes(data: st.DataObject, raw: bytes) -> bytes:
    mutable = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        mutable[data.draw(st.integers(0, len(mutable) - 1))] ^= data.draw(st.integers(1, 255))
    return bytes(mutable)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_hostile_evidence_or_request_stops_the_validator(engine: Engine, honest: Served,
                                                            data: st.DataObject) -> None:
    """Zero crashes, and with a healthy engine a verdict every time: a contract broken
    anywhere (request, terms, ids, counts) is a failure, never an exception or a shrug."""
    served, broken = honest, False
    if data.draw(st.booleans()):
        messages = data.draw(st.lists(st.tuples(st.text(max_size=32), st.text(max_size=300)), max_size=3))
        served = replace(served, request=signed_request(engine.model_name, data.draw(WIRE_PARAMS), messages))
        broken = True
    how = data.draw(st.sampled_from(["none", "artifact", "bytes"]))
    if how == "artifact":
        served = served.with_artifact(mutate(data, decoded(honest)))
    elif how == "bytes":
        served = served.with_artifact(flip_bytes(data, honest.artifact))
    if data.draw(st.booleans()):
        served = replace(served, prompt_tokens=data.draw(st.integers(0, 2**31)),
                         completion_tokens=data.draw(st.integers(0, 2**31)))
        broken = broken or (served.prompt_tokens, served.completion_tokens) != (
            honest.prompt_tokens, honest.completion_tokens)
    verdict = asyncio.run(judge(engine, served))
    assert isinstance(verdict, VerdictStats)
    if broken:
        assert not verdict.valid


async def test_a_validator_with_a_smaller_context_cap_does_not_fail_honest_work(engine: Engine) -> None:
    """Attack: a client's long request, served honestly by an executor that runs the model's
    full context, exceeds the context cap its validator's operator chose (``--max-model-len``,
    node.toml's ``max_model_len``; genesis pins only the model's files and dtype). Judged by
    its own cap (``check_request``, ``check_scorable``) the validator failed the work ("contract:
    the request cannot be run"): a signed accusation of honest work by every validator with a
    smaller cap. A limit that is this node's own is not the executor's fault: it cannot judge
    (None, accusing no one); what exceeds the model's own context still fails."""
    from helpers import MODEL

    from gonka_p2p.inference.factory import load_engine
    from gonka_p2p.inference.models import ModelSpec

    greedy = SamplingParams(max_tokens=16)
    served = await honest_work(engine, greedy)
    prompt = prompt_of(engine, served.request)
    capped = load_engine("torch", ModelSpec(MODEL, max_model_len=len(prompt) + greedy.max_tokens // 2))
    assert capped.model_name == engine.model_name and capped.local_model.max_context < engine.local_model.max_context
    assert capped.local_model.model_context == engine.local_model.max_context
    assert len(prompt) + len(decoded(served).completion_ids) > capped.local_model.max_context
    honest = await judge(engine, served)
    assert honest is not None and honest.valid  # the executor's work is honest
    assert await judge(capped, served) is None, "a validator whose operator capped the context judged the work"
