"""Attack class: the executor, not the client, decides what was asked.

On main validators judged an artifact by the sampling parameters and ``max_tokens`` the
artifact itself stated, and the ledger billed the token counts the executor stated. So an
executor asked for 64 tokens that produced 4 and said so was judged valid (and billed more
than an honest one); greedy instead of the requested T = 1 passed; and one seed admitted
dozens of different completions that all validated, each stating the parameters it used.
Now the client's signed request is the contract: model, prompt, parameters, max_tokens and
seed (the inference id) come from it, an artifact stating other terms fails, and the counts
the ledger recorded from the executor's Finish must be the artifact's.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from served_evidence import NONCE_BYTES, Served, honest_work, id_of, judge, prompt_of, signed_request

from gonka_p2p.adversary import cheats
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.sampler import SamplingParams

GREEDY = SamplingParams(max_tokens=16)
T1 = SamplingParams(max_tokens=16, temperature=1.0)


async def stated(engine: Engine, asked: SamplingParams, used: SamplingParams, nonce: int = 0) -> Served:
    """An executor asked for ``asked`` that ran ``used``, stated it in its artifact and
    claimed the counts it produced (``nonce`` picks another request, so another seed)."""
    request = signed_request(engine.model_name, asked, nonce=nonce.to_bytes(NONCE_BYTES, "big"))
    artifact = await cheats.honest(engine)(prompt_of(engine, request), used, id_of(request))
    return Served.honestly(request, artifact)


async def valid(engine: Engine, served: Served) -> bool:
    verdict = await judge(engine, served)
    assert verdict is not None  # the engine is healthy: there is always a verdict
    return verdict.valid


@pytest.mark.parametrize("params", [GREEDY, T1], ids=["greedy", "T=1"])
async def test_work_on_the_requested_terms_passes(engine: Engine, params: SamplingParams) -> None:
    assert await valid(engine, await honest_work(engine, params))


async def test_fewer_tokens_stated_as_a_smaller_max_tokens_fail(engine: Engine) -> None:
    asked = replace(T1, max_tokens=64)
    served = await stated(engine, asked, replace(asked, max_tokens=4))
    assert served.completion_tokens == 4  # no end-of-sequence: it stopped because it chose to
    assert not await valid(engine, served)


async def test_more_tokens_than_requested_fail(engine: Engine) -> None:
    """The first of a few requests whose T = 1 completion runs past the 8 tokens asked: which
    seed ends early at the model's end of sequence depends on the model build (transformers
    5.19 ended the first one after 7), so the test finds one instead of assuming it."""
    for nonce in range(16):
        served = await stated(engine, replace(T1, max_tokens=8), T1, nonce)
        if served.completion_tokens > 8:
            break
    else:
        pytest.fail("no T = 1 completion of 16 requests ran past 8 tokens")
    assert not await valid(engine, served)


async def test_greedy_instead_of_the_requested_temperature_fails(engine: Engine) -> None:
    assert not await valid(engine, await stated(engine, T1, replace(T1, temperature=0.0)))


@pytest.mark.parametrize("used", [replace(T1, temperature=0.5), replace(T1, top_k=5), replace(T1, top_p=0.5),
                                  replace(T1, logprobs_k=6)], ids=["temperature", "top_k", "top_p", "logprobs_k"])
async def test_other_sampling_parameters_stated_fail(engine: Engine, used: SamplingParams) -> None:
    assert not await valid(engine, await stated(engine, T1, used))


async def test_steering_through_parameter_choice_fails(engine: Engine) -> None:
    """One seed, many parameter sets, each completion honestly generated and stated: the
    executor could keep whichever it liked. None is the requested work, so none passes."""
    choices = [SamplingParams(max_tokens=16, temperature=t, top_p=p, top_k=k)
               for t in (0.3, 0.6, 1.3, 2.0) for p in (0.5, 0.9, 1.0) for k in (0, 20)]
    served = [await stated(engine, T1, used) for used in choices]
    completions = {tuple(InferenceArtifact.decode(s.artifact).completion_ids) for s in served}
    assert len(completions) >= 8  # many different completions on offer
    for s in served:
        assert not await valid(engine, s)


async def test_an_artifact_for_another_model_fails(engine: Engine) -> None:
    honest = await honest_work(engine, T1)
    renamed = replace(InferenceArtifact.decode(honest.artifact), model="another-model")
    assert not await valid(engine, honest.with_artifact(renamed))


@pytest.mark.parametrize("billed", [{"completion_tokens": 1}, {"prompt_tokens": 1}, {"prompt_tokens": -1}],
                         ids=repr)
async def test_counts_the_ledger_bills_must_be_the_artifacts(engine: Engine, billed: dict[str, int]) -> None:
    honest = await honest_work(engine, T1)
    inflated = replace(honest, **{field: getattr(honest, field) + extra for field, extra in billed.items()})
    assert not await valid(engine, inflated)
