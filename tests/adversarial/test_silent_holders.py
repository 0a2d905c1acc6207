"""A lying executor that answers a validator's evidence requests slowly or never.

Its weapon is the fetch timeout: each request it leaves unanswered costs the asker 30 s. What
must hold: one request at a time per holder however many duties it holds, none again for
``RETRY_AFTER_BLOCKS`` after the network did not reach it, a slow holder holds one of the
validator's slots while other holders' evidence is fetched beside it, the TA that kept the
evidence is asked beside a silent executor (not after its timeout), and a fetch ends at the
height its caller names.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from helpers import eventually
from served_evidence import VALIDATOR, id_of, signed_request

from gonka_p2p.actors.artifact_server import FORBIDDEN
from gonka_p2p.actors.evidence_fetch import (
    ASK_ALL_BEFORE_BLOCKS,
    RETRY_AFTER_BLOCKS,
    Evidence,
    EvidenceFetcher,
    RECOVERY_S,
    HeightWatch,
    Unreachable,
)
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.messages import ArtifactReply, InferenceFailed

PARAMS = SimpleNamespace(max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, logprobs_k=5)
SILENT, SLOW, HONEST, OTHER = (Keypair.from_seed(n) for n in (b"silent", b"slow", b"honest", b"other"))
ARTIFACT = b"the committed artifact"
REQUEST = signed_request("m", PARAMS)


class Holders:
    """The network: honest holders serve at once; SLOW answers (honestly) once ``release`` is
    set; SILENT never answers, its requests time out when ``release`` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.most_in_flight: Counter[str] = Counter()

    async def request(self, peer: str, protocol: str, data: bytes, timeout: float | None = None) -> bytes:
        self.asked[peer] += 1
        self.in_flight[peer] += 1
        self.most_in_flight[peer] = max(self.most_in_flight[peer], self.in_flight[peer])
        try:
            if peer in (SILENT.peer_id, SLOW.peer_id):
                await self.release.wait()
            if peer == SILENT.peer_id:
                raise TimeoutError(f"{peer} did not answer")
            signer = next(k for k in (SLOW, HONEST, OTHER) if k.peer_id == peer)
            return seal(ArtifactReply(request=REQUEST, artifact=ARTIFACT), signer)
        finally:
            self.in_flight[peer] -= 1


def record(executor: Keypair, ta: Keypair | None) -> SimpleNamespace:
    return SimpleNamespace(executor=executor.peer_id, ta=(ta or executor).peer_id,
                           artifact_commitment=digest(ARTIFACT))


async def fetch(fetcher: EvidenceFetcher, executor: Keypair, give_up_at: int | None = None,
                ta: Keypair | None = None) -> Evidence | Unreachable | None:
    async with fetcher.fetch(id_of(REQUEST), record(executor, ta), give_up_at) as got:  # type: ignore[arg-type]
        return got


def at_height(height: int) -> HeightWatch:
    heights = HeightWatch()
    heights.advance(height)
    return heights


async def test_a_silent_holder_is_asked_once_for_all_its_duties_and_not_again_until_the_retry() -> None:
    holders, heights = Holders(), at_height(100)
    fetcher = EvidenceFetcher(holders, VALIDATOR, heights)  # type: ignore[arg-type]
    duties = [asyncio.create_task(fetch(fetcher, SILENT)) for _ in range(20)]
    await eventually(lambda: holders.asked[SILENT.peer_id], what="the first request")
    holders.release.set()  # its timeout
    got = await asyncio.gather(*duties)
    assert got == [Unreachable((SILENT.peer_id,))] * 20
    assert holders.asked[SILENT.peer_id] == 1  # 20 duties, one timeout
    heights.advance(100 + RETRY_AFTER_BLOCKS - 1)
    assert await fetch(fetcher, SILENT) == Unreachable((SILENT.peer_id,))
    assert holders.asked[SILENT.peer_id] == 1
    heights.advance(100 + RETRY_AFTER_BLOCKS)
    assert await fetch(fetcher, SILENT) == Unreachable((SILENT.peer_id,))
    assert holders.asked[SILENT.peer_id] == 2


async def test_a_slow_holder_holds_one_slot_while_the_others_are_served() -> None:
    holders = Holders()
    fetcher = EvidenceFetcher(holders, VALIDATOR, at_height(100), slots=2)  # type: ignore[arg-type]
    slow = [asyncio.create_task(fetch(fetcher, SLOW)) for _ in range(10)]
    await eventually(lambda: holders.asked[SLOW.peer_id], what="the slow holder's first request")
    served = await asyncio.wait_for(asyncio.gather(fetch(fetcher, HONEST), fetch(fetcher, OTHER)), 10)
    assert all(isinstance(s, Evidence) and s.artifact == ARTIFACT for s in served)
    assert holders.most_in_flight[SLOW.peer_id] == 1
    holders.release.set()
    assert all(isinstance(s, Evidence) for s in await asyncio.gather(*slow))
    assert holders.asked[SLOW.peer_id] == 10  # it answered: each duty asks it in turn


async def test_evidence_being_judged_holds_its_slot() -> None:
    """The slots bound the evidence held in memory, not only the requests in flight."""
    holders = Holders()
    fetcher = EvidenceFetcher(holders, VALIDATOR, at_height(100), slots=1)  # type: ignore[arg-type]
    async with fetcher.fetch(id_of(REQUEST), record(HONEST, None)) as first:  # type: ignore[arg-type]
        assert isinstance(first, Evidence)
        second = asyncio.create_task(fetch(fetcher, OTHER))
        for _ in range(20):
            await asyncio.sleep(0)  # let it run as far as it can
        assert not holders.asked[OTHER.peer_id] and not second.done()
    assert isinstance(await second, Evidence)


async def test_a_fetch_the_holder_leaves_unanswered_gives_up_at_the_height_named() -> None:
    """Seconds are not blocks: at fast blocks a 30 s timeout outlasts the whole margin in which
    the silence is to be judged withheld, and the accusation would come after the deadline --
    none at all, and a skipped duty for the validator."""
    holders, heights = Holders(), at_height(100)
    fetcher = EvidenceFetcher(holders, VALIDATOR, heights)  # type: ignore[arg-type]
    asking = asyncio.create_task(fetch(fetcher, SILENT, give_up_at=103))
    queued = asyncio.create_task(fetch(fetcher, SILENT, give_up_at=102))
    await eventually(lambda: holders.in_flight[SILENT.peer_id], what="the request")
    heights.advance(102)
    assert await asyncio.wait_for(queued, 10) == Unreachable((SILENT.peer_id,))  # given up in the queue
    assert not asking.done()
    heights.advance(103)
    assert await asyncio.wait_for(asking, 10) == Unreachable((SILENT.peer_id,))
    assert holders.in_flight[SILENT.peer_id] == 0  # the request was dropped, its slot given back
    assert isinstance(await fetch(fetcher, HONEST, give_up_at=103), Evidence)  # at once: no cutoff needed


async def test_the_ta_is_asked_beside_an_executor_that_keeps_silent() -> None:
    """A lying executor's silence costs the asker its whole timeout (30 s): asked in turn, the TA
    that kept the evidence would wait behind it, and near the deadline not be asked at all."""
    holders = Holders()
    fetcher = EvidenceFetcher(holders, VALIDATOR, at_height(100), hedge_after_s=0.05)  # type: ignore[arg-type]
    served = await asyncio.wait_for(fetch(fetcher, SILENT, ta=HONEST), 10)
    assert isinstance(served, Evidence) and served.artifact == ARTIFACT
    assert holders.asked == Counter({SILENT.peer_id: 1, HONEST.peer_id: 1})
    assert holders.in_flight[SILENT.peer_id] == 0  # the silent request was dropped, its slot given back


async def test_an_executor_that_answered_is_not_doubled_by_a_request_to_the_ta() -> None:
    holders = Holders()
    fetcher = EvidenceFetcher(holders, VALIDATOR, at_height(100), hedge_after_s=1000)  # type: ignore[arg-type]
    assert isinstance(await fetch(fetcher, HONEST, give_up_at=200, ta=OTHER), Evidence)
    assert holders.asked == Counter({HONEST.peer_id: 1})


async def test_the_ta_is_asked_at_once_when_the_executor_went_unanswered_before_or_the_cutoff_is_near() -> None:
    """A hedge measured in seconds may not fit before a cutoff measured in blocks."""
    holders, heights = Holders(), at_height(100)
    fetcher = EvidenceFetcher(holders, VALIDATOR, heights, hedge_after_s=1000)  # type: ignore[arg-type]
    near = asyncio.create_task(fetch(fetcher, SILENT, give_up_at=100 + ASK_ALL_BEFORE_BLOCKS, ta=HONEST))
    assert isinstance(await asyncio.wait_for(near, 10), Evidence)
    holders.release.set()
    assert await fetch(fetcher, SILENT) == Unreachable((SILENT.peer_id,))  # remembered as unreached
    heights.advance(100 + RETRY_AFTER_BLOCKS)
    holders.release = asyncio.Event()  # silent again, with the retry due
    retry = asyncio.create_task(fetch(fetcher, SILENT, give_up_at=1000, ta=HONEST))
    assert isinstance(await asyncio.wait_for(retry, 10), Evidence)
    assert holders.asked[SILENT.peer_id] == 3 and holders.in_flight[SILENT.peer_id] == 0


async def test_a_fetch_started_at_its_cutoff_waits_for_the_answer() -> None:
    """Cut at once, it would report holders silent that were never given the time to answer."""
    holders = Holders()
    fetcher = EvidenceFetcher(holders, VALIDATOR, at_height(103))  # type: ignore[arg-type]
    late = asyncio.create_task(fetch(fetcher, SLOW, give_up_at=103))
    await eventually(lambda: holders.asked[SLOW.peer_id], what="the request")
    holders.release.set()
    assert isinstance(await asyncio.wait_for(late, 10), Evidence)


async def test_a_holder_that_refuses_the_validator_as_a_reader_is_asked_again_not_judged_a_withholder() -> None:
    """Race, or a holder's excuse: a holder serves evidence only to peers its replica knows as
    validators (``artifact_server.may_read_evidence``: the evidence is the client's answer), and
    a replica a block behind the one that made this validator one refuses it (``forbidden``).
    Read as "no evidence" that would be a withheld verdict -- an accusation of honest work; it
    is ``Unreachable`` instead: asked again, and judged withheld only as a silent holder is,
    near the deadline. An answer that it keeps nothing still reads as no evidence."""

    class Refusing:
        def __init__(self, code: str) -> None:
            self.code = code

        async def request(self, peer: str, protocol: str, data: bytes, timeout: float | None = None) -> bytes:
            return seal(InferenceFailed(code=self.code, message="refused"), HONEST)

    refused = EvidenceFetcher(Refusing(FORBIDDEN), VALIDATOR, at_height(100))  # type: ignore[arg-type]
    assert await fetch(refused, HONEST) == Unreachable((HONEST.peer_id,))
    missing = EvidenceFetcher(Refusing("not_found"), VALIDATOR, at_height(100))  # type: ignore[arg-type]
    assert await fetch(missing, HONEST) is None


async def test_silence_heard_while_this_node_lagged_or_recovered_witnesses_nothing() -> None:
    """Testnet runs 24, 25: a validator whose own link was capped for 90 s reached neither the
    executor nor the TA of honest work -- its connections stayed stalled after the cap -- and
    accused them of withholding. Silence heard from when its replica fell behind until
    ``RECOVERY_S`` later is not ``witnessed``, even where the request started before and its
    failure is remembered past the recovery (the retry's backoff), or it was cut off at the
    deadline; a holder still silent when asked afterwards is."""
    now = [1000.0]
    holders, heights = Holders(), at_height(100)
    fetcher = EvidenceFetcher(holders, VALIDATOR, heights, clock=lambda: now[0])  # type: ignore[arg-type]
    holders.release.set()  # every request to SILENT times out at once
    assert (await fetch(fetcher, SILENT)).witnessed  # type: ignore[union-attr]  # a sound node: evidence
    heights.advance(100 + RETRY_AFTER_BLOCKS)
    fetcher.note_impaired()
    lagging = await fetch(fetcher, SILENT)
    assert lagging == Unreachable((SILENT.peer_id,)) and not lagging.witnessed  # type: ignore[union-attr]
    now[0] += RECOVERY_S
    assert not (await fetch(fetcher, SILENT)).witnessed  # type: ignore[union-attr]  # remembered, not re-asked
    heights.advance(100 + 2 * RETRY_AFTER_BLOCKS)
    assert (await fetch(fetcher, SILENT)).witnessed  # type: ignore[union-attr]  # asked again, since recovered
    assert holders.asked[SILENT.peer_id] == 3

    holders.release = asyncio.Event()  # silent until cut off at the deadline
    fetcher.note_impaired()
    heights.advance(100 + 3 * RETRY_AFTER_BLOCKS)
    cut = asyncio.create_task(fetch(fetcher, SILENT, give_up_at=100 + 3 * RETRY_AFTER_BLOCKS + 1))
    await eventually(lambda: holders.asked[SILENT.peer_id] == 4, what="the request")
    heights.advance(100 + 3 * RETRY_AFTER_BLOCKS + 1)
    got = await asyncio.wait_for(cut, 10)
    assert got == Unreachable((SILENT.peer_id,)) and not got.witnessed  # type: ignore[union-attr]
