"""Validation through the serving engine: verdicts from top-K evidence equal the reference.

The reference judges from full logits rows (the torch engine, ``with_logits``);
a participant's validator judges from one prefill's top ``EVIDENCE_TOP_K``
logprobs (``topk_evidence``). On the tiny model, over honest work and every
cheat of ``gonka_p2p.adversary.cheats``, in greedy, nucleus, top-k and plain
T = 1 sampling (the mode whose tail the evidence leaves open), the two
verdicts must agree: same validity, same evidence class; and so must the
validator's whole check path (``served_check``: the top-K, then the whole
vocabulary while positions stay undecidable). The last test runs
the same comparison on evidence scored by the vLLM engine itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib

import pytest
import torch

from gonka_p2p.adversary import cheats
from gonka_p2p.inference import verification
from gonka_p2p.inference import verification_params
from gonka_p2p.inference.artifacts import InferenceArtifact
from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.model_names import TINY_MODEL
from gonka_p2p.inference.sampler import SamplingParams, choose_token, claim_margins, position_uniform
from gonka_p2p.inference.served_check import check_in_engine
from gonka_p2p.inference.topk_evidence import EVIDENCE_TOP_K, _sampling_bounds
from gonka_p2p.inference.torch_engine import TorchEngine
from gonka_p2p.inference.verification import Contract, Evidence, Verdict

THRESHOLDS = verification_params.load_verification_params().for_model(TINY_MODEL)
MODES = {
    "greedy": SamplingParams(max_tokens=24),
    "nucleus": SamplingParams(max_tokens=24, temperature=0.7, top_p=0.9),
    "top-k": SamplingParams(max_tokens=24, temperature=1.3, top_k=40),
    "plain": SamplingParams(max_tokens=24, temperature=1.0),
}
QUESTIONS = ("Write a short story about a robot who learns to paint.", "Describe the ocean.",
             "What is the capital of France?")
ROWS = ("honest", *cheats.CHEATS)
PER_MODE = 2


@pytest.fixture(scope="module")
def engine() -> TorchEngine:
    return TorchEngine(TINY_MODEL)


async def work(engine: TorchEngine, row: str, mode: str, i: int) -> tuple[InferenceArtifact, Contract]:
    params = MODES[mode]
    ids = engine.encode_chat([("user", QUESTIONS[i % len(QUESTIONS)])])
    seed = hashlib.blake2b(f"{row}/{mode}/{i}".encode(), digest_size=16).digest()
    strategy = cheats.honest(engine) if row == "honest" else cheats.make_cheater(row, engine)
    return await strategy(ids, params, seed), Contract(engine.model_name, tuple(ids), params, seed)


async def verdicts(reference: TorchEngine, validator: Engine, artifact: InferenceArtifact,
                   contract: Contract) -> tuple[Verdict, Verdict]:
    """(reference verdict from logits rows, the validator's from its top-K evidence)."""
    prompt = list(contract.prompt_ids)
    rows = await reference.score(prompt, artifact.completion_ids, 5, with_logits=True)
    top = await validator.score(prompt, artifact.completion_ids, EVIDENCE_TOP_K)
    eos = reference.eos_token_ids
    return (verification.verify(artifact, rows, THRESHOLDS, contract=contract, eos_token_ids=eos),
            verification.verify(artifact, top, THRESHOLDS, contract=contract, eos_token_ids=eos,
                                vocab_size=reference.local_model.vocab_size))


@pytest.mark.parametrize("row", ROWS)
async def test_top_k_verdicts_equal_the_reference(engine: TorchEngine, row: str) -> None:
    for mode in MODES:
        for i in range(PER_MODE):
            artifact, contract = await work(engine, row, mode, i)
            ref, top = await verdicts(engine, engine, artifact, contract)
            assert (top.valid, top.evidence) == (ref.valid, ref.evidence), (mode, i, ref.reasons, top.reasons)
            assert top.sampling_mismatches <= ref.sampling_mismatches  # floors: only proven misses
            if row == "honest":
                assert ref.valid


async def test_plain_sampling_leaves_undecidable_positions_within_the_honest_bound(engine: TorchEngine) -> None:
    """At T = 1 with no filter the tail beyond the top-K is open: some honest positions are
    undecidable, and rule 6 lets them through (its bound is computed from the evidence)."""
    undecidable = 0
    for i in range(6):
        artifact, contract = await work(engine, "honest", "plain", i)
        rows = await engine.score(list(contract.prompt_ids), artifact.completion_ids, EVIDENCE_TOP_K)
        m = verification.measure(artifact, rows, eos_token_ids=engine.eos_token_ids, contract=contract,
                                 vocab_size=engine.local_model.vocab_size)
        count = verification.undecidable_positions(m, THRESHOLDS)
        assert count <= m.honest_undecidable * 3 + 2, (count, m.honest_undecidable)
        assert verification.judge(m, THRESHOLDS).valid
        undecidable += count
    assert undecidable > 0  # the path is exercised


async def test_the_served_check_gives_the_reference_verdict_and_rescores_only_the_undecided(
        engine: TorchEngine) -> None:
    rescored = 0
    for row in ("honest", "prefill", "wrong-temperature"):
        for mode in ("greedy", "plain"):
            for i in range(3):
                artifact, contract = await work(engine, row, mode, i)
                ref, top = await verdicts(engine, engine, artifact, contract)
                check = await check_in_engine(engine, artifact, contract, THRESHOLDS)
                assert (check.verdict.valid, check.verdict.evidence) == (ref.valid, ref.evidence), (row, mode, i)
                assert check.first_undecidable == top.undecidable
                assert check.second_pass == (top.valid and (top.undecidable > 0 or top.wide_ties_open))
                assert mode == "plain" or not check.second_pass  # greedy is always decided
                rescored += check.second_pass
    assert rescored > 0  # the path is exercised


async def test_wide_ties_the_top_k_tail_leaves_open_send_the_output_to_the_whole_vocabulary(
        engine: TorchEngine) -> None:
    """Top-K margins are floors: a cheat whose wide near-ties hide in the open tail must not
    stay clean on an undercount. An output whose ceilings could reach the wide-tie limit while
    its floors do not is open (the served check then re-scores it whole); one whose ceilings
    cannot is decided clean."""
    bf16 = verification_params.load_verification_params(dtypes={TINY_MODEL: "bfloat16"}).for_model(TINY_MODEL)
    artifact, contract = await work(engine, "honest", "greedy", 0)
    rows = await engine.score(list(contract.prompt_ids), artifact.completion_ids, EVIDENCE_TOP_K)
    m = verification.measure(artifact, rows, eos_token_ids=engine.eos_token_ids, contract=contract,
                             vocab_size=engine.local_model.vocab_size)
    wide, tie = (f(bf16, 0.0) for f in (verification_params.wide_tie_floor, verification_params.tie_tolerance))
    limit = verification_params.wide_tie_limit(m.n_tokens)
    between = (wide + tie) / 2  # decided for the sampling rule, open for the wide-tie count
    for open_positions, is_open in ((limit, True), (limit - 1, False)):
        ceilings = [between] * open_positions + list(m.sampling_ceilings[open_positions:])
        verdict = verification.judge(dataclasses.replace(m, sampling_ceilings=tuple(ceilings)), bf16)
        assert verdict.valid and verdict.evidence is Evidence.CLEAN and verdict.undecidable == 0
        assert verdict.wide_ties == 0 and verdict.wide_ties_open is is_open, open_positions


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=1, temperature=0.7, top_p=0.9),
                                    SamplingParams(max_tokens=1, temperature=1.3, top_p=0.8, top_k=50)],
                         ids=["nucleus", "top-k and top-p"])
def test_an_open_top_p_cut_bounds_every_nucleus_it_allows(params: SamplingParams) -> None:
    """Away from T = 1 the tail's total weight is open, so the top-p threshold is too: a few
    tokens at the cut may or may not be in the nucleus. Such rows used to be left undecidable
    whole (5 of 6 honest SmolLM2 outputs at T = 0.7, top-p 0.9 needed the whole-vocabulary pass
    for them alone); each nucleus the open cut allows now bounds the claimed token's interval.
    Over rows with a peaked head and 4-17 % of the mass in a flat tail beyond the top-K, floors
    never exceed the whole row's margin, ceilings never fall below it, and honest picks are
    decided unless the cut may fall in the tail or on the pick itself."""
    gen = torch.Generator().manual_seed(11)
    vocab, k, positions = 3000, 64, 16
    open_ceilings = 0
    for trial in range(30):
        row = torch.cat([torch.randn(k, generator=gen) * 1.5 + 5.0, torch.randn(vocab - k, generator=gen) * 0.5])
        row = row[torch.randperm(vocab, generator=gen)]
        lp = torch.log_softmax(row.double(), dim=-1)
        top = torch.topk(lp, k)
        seed = b"open-cut-%d" % trial
        honest = torch.tensor([choose_token(row, params, seed, i) for i in range(positions)])
        others = top.indices[:positions]  # every position also claims a head token it did not pick
        u = torch.tensor([position_uniform(seed, i) for i in range(positions)], dtype=torch.float64)
        for claimed in (honest, others):
            floor, ceiling, *_ = _sampling_bounds(top.indices.repeat(positions, 1), top.values.repeat(positions, 1),
                                                  claimed, lp[claimed], u, params, vocab)
            reference, _, _ = claim_margins(row.repeat(positions, 1), params, seed, claimed)
            assert bool((floor <= reference + 1e-12).all()), (trial, floor, reference)
            assert bool((reference <= ceiling + 1e-12).all()), (trial, reference, ceiling)
            open_ceilings += int(torch.isinf(ceiling).sum()) if claimed is honest else 0
    assert open_ceilings <= 0.1 * 30 * positions, open_ceilings


def test_a_too_short_evidence_list_is_not_compared(engine: TorchEngine) -> None:
    artifact, contract = asyncio.run(work(engine, "honest", "greedy", 0))
    short = asyncio.run(engine.score(list(contract.prompt_ids), artifact.completion_ids, 3))
    verdict = verification.verify(artifact, short, THRESHOLDS, contract=contract,
                                  eos_token_ids=engine.eos_token_ids, vocab_size=engine.local_model.vocab_size)
    assert not verdict.valid and "fewer than 5 top ids" in verdict.reasons[0]


@pytest.mark.slow
def test_vllm_evidence_gives_the_reference_verdicts(engine: TorchEngine) -> None:
    """The same comparison with the evidence scored by the serving engine (vLLM, in-process,
    one engine, no torch copy loaded by it)."""
    from gonka_p2p.inference.vllm_engine import VLLMEngine

    async def run() -> None:
        served = VLLMEngine(TINY_MODEL, kv_cache_gib=0.25)
        try:
            for row in ("honest", "prefill", "int8", "wrong-temperature", "altered", "fabricated"):
                for mode in MODES:
                    artifact, contract = await work(engine, row, mode, 0)
                    ref, top = await verdicts(engine, served, artifact, contract)
                    assert (top.valid, top.evidence) == (ref.valid, ref.evidence), (row, mode, ref.reasons,
                                                                                     top.reasons)
        finally:
            await served.close()

    asyncio.run(run())
