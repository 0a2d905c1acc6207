"""The artifact of one inference: everything a validator needs to re-check it.

Per generated position: the chosen token id, its raw logprob and the top-k
(token id, raw logprob) pairs; plus the prompt token ids, the sampling
parameters and the seed. The ledger holds only ``commitment()``; the bytes
stay with the executor and TA until the epoch settles.

Compact encoding: a msgpack header, then one fixed-size little-endian record
per token -- ``u32 token, f32 logprob, k x (u32 id, f32 logprob)`` -- which is
8 + 8k bytes: 48 bytes per token for k = 5. Logprobs are stored as float32:
the verification thresholds are orders of magnitude above float32 rounding
(about 1e-7 relative).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from gonka_p2p.identity import digest
from gonka_p2p.inference.engine import TokenStep
from gonka_p2p.inference.sampler import SamplingParams

ARTIFACT_VERSION = 1
MAX_ARTIFACT_BYTES = 8 * 1024 * 1024


class ArtifactError(ValueError):
    """Artifact bytes that do not decode into a consistent artifact."""


@dataclass(frozen=True)
class InferenceArtifact:
    model: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: bytes
    steps: tuple[TokenStep, ...]

    @property
    def completion_ids(self) -> list[int]:
        return [s.token_id for s in self.steps]

    def encode(self) -> bytes:
        k = self.params.logprobs_k
        header = msgpack.packb(
            [ARTIFACT_VERSION, self.model, list(self.prompt_ids), self.params.max_tokens,
             self.params.temperature, self.params.top_p, self.params.top_k, k, self.seed,
             len(self.steps)],
            use_bin_type=True,
        )
        rows = np.zeros(len(self.steps), dtype=_row_dtype(k))
        for i, s in enumerate(self.steps):
            if len(s.top_ids) != k:
                raise ArtifactError(f"position {i} has {len(s.top_ids)} alternatives, not {k}")
            rows[i] = (s.token_id, s.logprob, s.top_ids, s.top_logprobs)
        return struct.pack("<I", len(header)) + header + rows.tobytes()

    def commitment(self) -> bytes:
        return digest(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> InferenceArtifact:
        if len(data) > MAX_ARTIFACT_BYTES or len(data) < 4:
            raise ArtifactError("artifact has an impossible size")
        (hlen,) = struct.unpack_from("<I", data)
        try:
            header = msgpack.unpackb(data[4 : 4 + hlen], raw=False)
            version, model, prompt, max_tokens, temp, top_p, top_k, k, seed, n = header
            params = SamplingParams(max_tokens=max_tokens, temperature=float(temp),
                                    top_p=float(top_p), top_k=top_k, logprobs_k=k)
            rows = np.frombuffer(data, dtype=_row_dtype(k), offset=4 + hlen)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as e:
            raise ArtifactError(f"malformed artifact: {e}") from None
        if version != ARTIFACT_VERSION or len(rows) != n or not isinstance(seed, bytes):
            raise ArtifactError("artifact header does not match its body")
        steps = tuple(
            TokenStep(int(r["token"]), float(r["logprob"]), tuple(int(x) for x in r["top_ids"]),
                      tuple(float(x) for x in r["top_logprobs"]))
            for r in rows
        )
        return cls(str(model), tuple(int(t) for t in prompt), params, seed, steps)


def _row_dtype(k: int) -> np.dtype:
    return np.dtype([("token", "<u4"), ("logprob", "<f4"),
                     ("top_ids", "<u4", (k,)), ("top_logprobs", "<f4", (k,))])


def response_hash(completion_ids: list[int]) -> bytes:
    """What the executor signs as "the answer": the digest of the completion token ids."""
    return digest(msgpack.packb(list(completion_ids)))
