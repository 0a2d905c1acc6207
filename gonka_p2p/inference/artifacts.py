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

import math
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from gonka_p2p.identity import digest
from gonka_p2p.inference.engine import TokenStep
from gonka_p2p.inference.sampler import SamplingParams
from gonka_p2p.wire.schema import WireError, unpack

ARTIFACT_VERSION = 1
MAX_ARTIFACT_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 256 * 1024  # 32,768 prompt ids of <= 5 bytes each, plus a little
MAX_PROMPT_IDS = 32_768
MAX_MODEL_CHARS = 128
MAX_TOKEN_ID = 2**32 - 1  # rows store ids as u32
MAX_TOKEN_COUNT = 32_768  # above max_tokens, top_k and logprobs_k bounds
MAX_SEED_BYTES = 64  # the seed is the inference id (32 bytes)


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
        """Total and bounded: any bytes give a consistent artifact or an ArtifactError.

        Artifacts come from executors, who may be hostile: every header field is
        type- and range-checked before it is used, and the body must be exactly
        ``n`` fixed-size rows, so no decode allocates more than its input justifies."""
        if not isinstance(data, (bytes, bytearray)) or not 4 <= len(data) <= MAX_ARTIFACT_BYTES:
            raise ArtifactError("artifact has an impossible size")
        (hlen,) = struct.unpack_from("<I", data)
        if hlen > min(MAX_HEADER_BYTES, len(data) - 4):
            raise ArtifactError("artifact header length is impossible")
        try:
            header = unpack(bytes(data[4 : 4 + hlen]), max_bytes=MAX_HEADER_BYTES)
        except WireError as e:
            raise ArtifactError(f"malformed artifact header: {e}") from None
        if not (isinstance(header, list) and len(header) == 10):
            raise ArtifactError("artifact header is not a 10-field list")
        version, model, prompt, max_tokens, temp, top_p, top_k, k, seed, n = header
        _require(version == ARTIFACT_VERSION and not isinstance(version, bool), "unknown artifact version")
        _require(isinstance(model, str) and len(model) <= MAX_MODEL_CHARS, "model is not a short string")
        _require(isinstance(prompt, list) and len(prompt) <= MAX_PROMPT_IDS
                 and all(_is_int(t, 0, MAX_TOKEN_ID) for t in prompt), "prompt ids are not token ids")
        _require(all(_is_int(v, 0, MAX_TOKEN_COUNT) for v in (max_tokens, top_k, k, n)),
                 "a count field is not an integer in range")
        _require(all(_is_number(v) for v in (temp, top_p)), "temperature/top_p are not numbers")
        _require(isinstance(seed, bytes) and len(seed) <= MAX_SEED_BYTES, "seed is not short bytes")
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=float(temp),
                                    top_p=float(top_p), top_k=top_k, logprobs_k=k)
        except ValueError as e:
            raise ArtifactError(f"artifact sampling parameters: {e}") from None
        dtype = _row_dtype(k)
        body = len(data) - 4 - hlen
        _require(body == n * dtype.itemsize, "artifact body does not hold n rows")
        rows = np.frombuffer(data, dtype=dtype, offset=4 + hlen)
        for column in ("logprob", "top_logprobs"):
            _require(not (np.isnan(rows[column]).any() or (rows[column] > 0).any()),
                     "a logprob is NaN or positive")
        steps = tuple(
            TokenStep(int(r["token"]), float(r["logprob"]), tuple(int(x) for x in r["top_ids"]),
                      tuple(float(x) for x in r["top_logprobs"]))
            for r in rows
        )
        return cls(model, tuple(prompt), params, seed, steps)


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise ArtifactError(f"malformed artifact: {what}")


def _is_int(value: object, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _row_dtype(k: int) -> np.dtype:
    return np.dtype([("token", "<u4"), ("logprob", "<f4"),
                     ("top_ids", "<u4", (k,)), ("top_logprobs", "<f4", (k,))])
