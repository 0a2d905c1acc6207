"""A lying executor that answers a validator's evidence requests slowly or never.

Its weapon is the fetch timeout: each request it leaves unanswered costs the asker 30 s. What
must hold: one request at a time per holder however many duties it holds, none again for
``RETRY_AFTER_BLOCKS`` after the network did not reach it, and a slow holder holds one of the
validator's slots while other holders' evidence is fetched beside it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from helpers import eventually
from served_evidence import VALIDATOR, id_of, signed_request

from gonka_p2p.actors.evidence_fetch import RETRY_AFTER_BLOCKS, Evidence, EvidenceFetcher, Unreachable
from gonka_p2p.identity import Keypair, digest
from gonka_p2p.wire.envelope import seal
from gonka_p2p.wire.messages import ArtifactReply

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


def record(holder: Keypair) -> SimpleNamespace:
    return SimpleNamespace(executor=holder.peer_id, ta=holder.peer_id, artifact_commitment=digest(ARTIFACT))


async def fetch(fetcher: EvidenceFetcher, holder: Keypair) -> Evidence | Unreachable | None:
    async with fetcher.fetch(id_of(REQUEST), record(holder)) as got:  # type: ignore[arg-type]
        return got


async def test_a_silent_holder_is_asked_once_for_all_its_duties_and_not_again_until_the_retry() -> None:
    holders, height = Holders(), [100]
    fetcher = EvidenceFetcher(holders, VALIDATOR, lambda: height[0])  # type: ignore[arg-type]
    duties = [asyncio.create_task(fetch(fetcher, SILENT)) for _ in range(20)]
    await eventually(lambda: holders.asked[SILENT.peer_id], what="the first request")
    holders.release.set()  # its timeout
    got = await asyncio.gather(*duties)
    assert got == [Unreachable((SILENT.peer_id,))] * 20
    assert holders.asked[SILENT.peer_id] == 1  # 20 duties, one timeout
    height[0] += RETRY_AFTER_BLOCKS - 1
    assert await fetch(fetcher, SILENT) == Unreachable((SILENT.peer_id,))
    assert holders.asked[SILENT.peer_id] == 1
    height[0] += 1
    assert await fetch(fetcher, SILENT) == Unreachable((SILENT.peer_id,))
    assert holders.asked[SILENT.peer_id] == 2


async def test_a_slow_holder_holds_one_slot_while_the_others_are_served() -> None:
    holders = Holders()
    fetcher = EvidenceFetcher(holders, VALIDATOR, lambda: 100, slots=2)  # type: ignore[arg-type]
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
    fetcher = EvidenceFetcher(holders, VALIDATOR, lambda: 100, slots=1)  # type: ignore[arg-type]
    async with fetcher.fetch(id_of(REQUEST), record(HONEST)) as first:  # type: ignore[arg-type]
        assert isinstance(first, Evidence)
        second = asyncio.create_task(fetch(fetcher, OTHER))
        for _ in range(20):
            await asyncio.sleep(0)  # let it run as far as it can
        assert not holders.asked[OTHER.peer_id] and not second.done()
    assert isinstance(await second, Evidence)

