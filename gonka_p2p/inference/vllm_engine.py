"""The executor's engine: vLLM in-process, streaming, continuously batched.

**Synchronous ``LLMEngine`` on a dedicated thread, not ``AsyncLLM``.**
vLLM 0.32's ``AsyncLLM`` always runs its engine core in a second, spawned
process (``EngineCoreClient.make_async_mp_client``; there is no in-process
async client). Measured here (SmolLM2-135M fp32, 1 KV GiB, 1 OMP thread, 2
shared and busy cores):

* ``LLMEngine`` on a thread: ready in ~6 s, one process of 2.5 GB RSS,
  17 tok/s for one request, 108 tok/s for 8 concurrent ones;
* ``AsyncLLM``: ready in ~35 s, 4 processes of 3.7 GB RSS in all,
  15 and 107 tok/s.

(start excludes ~6 s of ``import vllm``; RSS is ~1.0 GB runtime + 0.54 GB
weights + the KV cache, which vLLM commits up front.) The spawned core also
forces an ``if __name__ == "__main__"`` guard on every entry point. So
``LLMEngine`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs scheduler,
model and sampler in this process; one thread owns it (vLLM is not
thread-safe) and loops: take new requests and aborts from a queue,
``step()``, hand each request's new tokens to its asyncio queue with
``call_soon_threadsafe``. Requests arriving while others run join the batch
at the next step (vLLM's scheduler does the continuous batching). Model
compute releases the GIL; with 8 requests decoding, the event loop's lag was
p50 0.2 ms, p99 5 ms. The engine is also *built* on that thread so vLLM's
CPU thread setup applies to the thread that computes.

**Token choice = the sampler's rule, for the whole batch at once.** Every
request carries its sampling rule and seed in ``SamplingParams.extra_args``;
one batch-level logits processor (:class:`SeededSampling`, a vLLM v1
``LogitsProcessor``) keeps each row's rule as device tensors, rebuilt only
when the batch changes (``update_state``), and per step runs
``sampler.sample_batch`` over the batch's logits on the engine's device --
tensor passes, no Python per request beyond reading each row's output length,
no copy of a logits row to the host -- then sets each chosen token's logit to
+inf; vLLM itself runs greedy (temperature 0), so its argmax is that token.
Checked in ``vllm/v1/sample/sampler.py``: with ``logprobs_mode="raw_logprobs"``
the returned logprobs are ``log_softmax(logits)`` computed *before* any logits
processor; processors that are not argmax-invariant (ours) run in
``apply_logits_processors`` before the greedy argmax, so greedy requests go
through it; the rows it sees are the model's float32 logits (no temperature,
penalties or bias: none are set). The position of a row is
``len(output_ids)``, the 0-based index of the token being chosen (the list is
vLLM's live reference to the request's output, handed over again when a
preempted request is re-added). The processor decides greedy rows too, so
ties break by the sampler's rule (lowest id), not by vLLM's argmax kernel.
The V1 model runner is pinned (``VLLM_USE_V2_MODEL_RUNNER=0``): V2 has its
own logits-processor pipeline this was not verified against.

**Tokenization is ours.** vLLM runs with ``skip_tokenizer_init``: prompts
arrive as ids encoded by the shared transformers tokenizer
(``models.LocalModel``), stop tokens are passed explicitly, and nothing is
detokenized on the hot path, so both engines see identical ids and stop
identically.

**Scoring.** ``score`` is one prefill with ``prompt_logprobs=k`` and
``max_tokens=1`` (vLLM's prompt logprobs are raw ``log_softmax`` too): per
position the scored token's logprob and the top k. A validator asks for
``k = topk_evidence.EVIDENCE_TOP_K`` and judges from that (``topk_evidence``),
in the engine that already holds the model; an output it cannot decide is
scored again with k = the vocabulary (``served_check``; ``max_logprobs`` is
uncapped for it). Full logits rows (``with_logits``) are
refused: vLLM returns them only as ``prompt_logprobs=-1`` (~50k Python floats
per position through its output processor, ~10 ms a position), and the torch
engine that has them would be a second copy of the model in this process; the
full-row reference runs out of process (the torch engine, as a cross-check
tool).

Process-wide side effects of an in-process vLLM engine (vLLM's, not ours):
it reseeds the global ``random``/``numpy``/``torch`` generators at start,
replaces ``torch.set_num_threads`` with a no-op, and binds memory to one
NUMA node. Only one engine should be open per process at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from vllm import SamplingParams as VllmSamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from gonka_p2p.inference.engine import EngineError, ScoredCompletion, TokenStep
from gonka_p2p.inference.model_names import DEFAULT_MODEL
from gonka_p2p.inference.models import LocalModel, LocalModelFrontend, ModelSpec, load_local_model, model_spec
from gonka_p2p.inference.sampler import RowRules, SamplingParams, sample_batch

log = logging.getLogger(__name__)

_RULE_KEY = "gonka_sampling"  # SamplingParams.extra_args key carrying the rule and seed
# vLLM keeps process-global state (distributed groups, env cache): closing one
# engine tears down another's, so a process holds at most one at a time.
_ONE_ENGINE = threading.Lock()


@dataclass(frozen=True)
class _Row:
    """One generating request's place in the batch, as ``SeededSampling`` keeps it."""

    params: SamplingParams
    seed: bytes
    output_ids: list[int]  # vLLM's live list: its length is the position being chosen


def _rule_of(params: VllmSamplingParams) -> tuple[SamplingParams, bytes] | None:
    """The sampler's rule and seed a request carries; None for scoring requests."""
    rule = (params.extra_args or {}).get(_RULE_KEY)
    if rule is None:
        return None
    return SamplingParams(**rule["params"]), bytes.fromhex(rule["seed"])


class SeededSampling(LogitsProcessor):
    """vLLM logits processor forcing ``sampler.sample_batch``'s pick on every generating
    row of the batch (scoring requests carry no rule and are left alone).

    Per step: the rows' positions (one ``len`` per request, copied to the device as
    one tensor), ``sample_batch`` on the device, one scatter of +inf. Per batch
    change: the rows' rules rebuilt as tensors (``RowRules.of``).
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._device = torch.device(device)
        self._pin = is_pin_memory
        self._vocab = vllm_config.model_config.get_vocab_size()
        self._rows: dict[int, _Row] = {}  # batch index -> the request there
        self._outputs: list[list[int]] = []  # the rows' output lists, in batch order
        self._index = torch.empty(0, dtype=torch.long, device=self._device)
        self._leading = True  # the ruled rows are exactly the batch's first rows
        self._rules: RowRules | None = None

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        _rule_of(sampling_params)  # a malformed rule fails its request, not the engine

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax; vLLM must apply it to greedy requests

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def row(params: VllmSamplingParams, _: Any, output_ids: list[int]) -> _Row | None:
            rule = _rule_of(params)
            return None if rule is None else _Row(*rule, output_ids)

        if not process_dict_updates(self._rows, batch_update, row):
            return
        order = sorted(self._rows)
        rows = [self._rows[i] for i in order]
        self._outputs = [r.output_ids for r in rows]
        self._index = torch.tensor(order, dtype=torch.long).to(self._device)
        self._leading = order == list(range(len(order)))
        self._rules = RowRules.of([(r.params, r.seed) for r in rows], self._vocab, self._device) \
            if rows else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._rules is None:
            return logits
        positions = torch.tensor(list(map(len, self._outputs)), dtype=torch.long,
                                 pin_memory=self._pin).to(self._device, non_blocking=True)
        n = len(self._outputs)
        rows = logits[:n] if self._leading else logits.index_select(0, self._index)
        tokens = sample_batch(rows, self._rules, positions)
        logits.index_put_((self._index, tokens), torch.tensor(float("inf"), device=logits.device))
        return logits


def rule_args(params: SamplingParams, seed: bytes) -> dict[str, Any]:
    """The ``extra_args`` that hand a request's rule and seed to ``SeededSampling``."""
    return {_RULE_KEY: {"params": dataclasses.asdict(params), "seed": seed.hex()}}


@dataclass
class _Route:
    """Where the driver thread sends one request's results: a queue on the caller's loop."""

    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue
    convert: Callable[[Any], Any]  # RequestOutput -> payload, run on the driver thread

    def send(self, item: Any) -> bool:
        """Hand ``item`` to the caller; False when its event loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, item)
            return True
        except RuntimeError:
            return False


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: VllmSamplingParams
    route: _Route


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class VLLMEngine(LocalModelFrontend):
    """``Engine`` over an in-process vLLM ``LLMEngine`` driven by one thread."""

    def __init__(
        self,
        model: str | ModelSpec = DEFAULT_MODEL,
        *,
        kv_cache_gib: float = 1.0,
        max_num_seqs: int = 32,
    ) -> None:
        """``kv_cache_gib``: the KV budget, unless the spec gives a ``gpu_memory_utilization``."""
        self._spec = model_spec(model)
        self._local: LocalModel = load_local_model(self._spec)
        self.model_name = self._local.name
        self.eos_token_ids = self._local.eos_token_ids
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._failure: EngineError | None = None
        self._closed = False
        # Guards (_closed, _failure) against the command queue, so no request
        # is queued after the driver thread stopped reading it.
        self._state_lock = threading.Lock()
        if not _ONE_ENGINE.acquire(blocking=False):
            raise EngineError(
                "another VLLMEngine is open in this process; vLLM keeps process-wide "
                "state, so close it before starting a new one"
            )
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._drive,
            args=(kv_cache_gib, max_num_seqs, ready),
            name=f"vllm-{self.model_name}",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if self._failure is not None:
            raise self._failure

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, seed: bytes
    ) -> AsyncIterator[TokenStep]:
        self._local.check_request(prompt_ids, params.max_tokens)
        vllm_params = self._vllm_params(
            output_kind=RequestOutputKind.DELTA,
            max_tokens=params.max_tokens,
            logprobs=params.logprobs_k,
            extra_args=rule_args(params, seed),
        )
        route = self._route(_generation_payload)
        request_id = self._submit(prompt_ids, vllm_params, route)
        finished = False
        try:
            while not finished:
                steps, finished = await self._receive(route)
                for step in steps:
                    yield step
        finally:
            if not finished:
                self._commands.put(_Abort(request_id))

    async def score(
        self,
        prompt_ids: list[int],
        completion_ids: list[int],
        k: int,
        with_logits: bool = False,
    ) -> ScoredCompletion:
        self._local.check_request(prompt_ids + completion_ids, 1)
        if with_logits:
            raise EngineError("vLLM scores with top-k evidence only (topk_evidence); full logits rows "
                              "are the torch engine's, run out of process as a cross-check")
        if not completion_ids:
            return ScoredCompletion(steps=[], logits=None)
        vllm_params = self._vllm_params(
            max_tokens=1, prompt_logprobs=k, output_kind=RequestOutputKind.FINAL_ONLY
        )
        route = self._route(lambda out: _score_payload(out, len(prompt_ids)))
        self._submit(prompt_ids + completion_ids, vllm_params, route)
        steps, _ = await self._receive(route)
        return ScoredCompletion(steps=steps, logits=None)

    async def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # -- asyncio side -------------------------------------------------------

    def _vllm_params(self, **kwargs: Any) -> VllmSamplingParams:
        """vLLM runs greedy on rows ``SeededSampling`` already decided; ids in, ids out."""
        return VllmSamplingParams(
            temperature=0.0,
            stop_token_ids=sorted(self.eos_token_ids),
            detokenize=False,
            flat_logprobs=True,
            **kwargs,
        )

    def _route(self, convert: Callable[[Any], Any]) -> _Route:
        return _Route(asyncio.get_running_loop(), asyncio.Queue(), convert)

    def _submit(self, prompt_ids: list[int], vllm_params: VllmSamplingParams, route: _Route) -> str:
        with self._state_lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise EngineError("the engine is closed")
            request_id = str(next(self._ids))
            self._commands.put(_Add(request_id, list(prompt_ids), vllm_params, route))
        return request_id

    @staticmethod
    async def _receive(route: _Route) -> Any:
        item = await route.results.get()
        if isinstance(item, BaseException):
            raise item
        return item

    # -- driver thread ------------------------------------------------------

    def _drive(self, kv_cache_gib: float, max_num_seqs: int, ready: threading.Event) -> None:
        """The only code that touches the vLLM engine: build it, step until closed, free it."""
        try:
            engine = self._start_vllm(kv_cache_gib, max_num_seqs)
        except Exception as exc:
            self._failure = EngineError(f"vLLM cannot load model {self._local.path}: {exc}")
            _forget_partial_start()
            _ONE_ENGINE.release()
            ready.set()
            return
        ready.set()
        try:
            self._serve(engine)
        finally:
            _ONE_ENGINE.release()

    def _serve(self, engine: Any) -> None:
        """Step while requests run, idle on the queue otherwise; on exit fail what is
        pending and free vLLM's resources."""
        routes: dict[str, _Route] = {}
        try:
            while self._serve_commands(engine, routes):
                if engine.has_unfinished_requests():
                    self._deliver(engine, engine.step(), routes)
        except Exception as exc:
            with self._state_lock:
                self._failure = EngineError(f"the vLLM engine failed: {exc}")
        finally:
            self._fail_pending(routes)
            engine.engine_core.shutdown()

    def _fail_pending(self, routes: dict[str, _Route]) -> None:
        """Tell every request still running or queued why it will get no more tokens."""
        with self._state_lock:
            self._closed = True
            reason = self._failure or EngineError("the engine is closed")
        for route in routes.values():
            route.send(reason)
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.route.send(reason)

    def _start_vllm(self, kv_cache_gib: float, max_num_seqs: int) -> Any:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the sampler path verified above
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.llm_engine import LLMEngine

        args = vllm_engine_args(self._local, self._spec, kv_cache_gib, max_num_seqs,
                                on_cpu=current_platform.is_cpu())
        return LLMEngine.from_engine_args(EngineArgs(**args))

    def _serve_commands(self, engine: Any, routes: dict[str, _Route]) -> bool:
        """Apply queued adds and aborts; block while idle. False once asked to stop."""
        idle = not engine.has_unfinished_requests()
        while True:
            try:
                command = self._commands.get(block=idle)
            except queue.Empty:
                return True
            idle = False
            if command is _STOP:
                return False
            if isinstance(command, _Abort):
                if routes.pop(command.request_id, None) is not None:
                    engine.abort_request([command.request_id])
                continue
            try:
                engine.add_request(
                    command.request_id, {"prompt_token_ids": command.prompt_ids}, command.params
                )
            except Exception as exc:
                command.route.send(EngineError(f"vLLM rejected the request: {exc}"))
                continue
            routes[command.request_id] = command.route

    @staticmethod
    def _deliver(engine: Any, outputs: list[Any], routes: dict[str, _Route]) -> None:
        for out in outputs:
            route = routes.get(out.request_id)
            if route is None:
                continue
            if out.finished:
                del routes[out.request_id]
            if not route.send(route.convert(out)) and not out.finished:
                del routes[out.request_id]  # its caller is gone
                engine.abort_request([out.request_id])


def vllm_engine_args(local: LocalModel, spec: ModelSpec, kv_cache_gib: float, max_num_seqs: int,
                     *, on_cpu: bool) -> dict[str, Any]:
    """vLLM's ``EngineArgs`` for ``spec``: the pinned dtype, our sampler and tokenization, and the
    operator's multi-GPU arguments -- which mean nothing on a CPU, where they are ignored with a
    note and the KV cache is ``kv_cache_gib``. On a GPU a ``gpu_memory_utilization`` sizes the
    KV cache instead (vLLM ignores it when a byte budget is given)."""
    args: dict[str, Any] = dict(
        model=str(local.path),
        dtype=spec.dtype,
        skip_tokenizer_init=True,
        logprobs_mode="raw_logprobs",
        max_logprobs=-1,  # a validator's top-K evidence, or the whole vocabulary to resolve it
        logits_processors=[SeededSampling],
        enforce_eager=True,
        max_model_len=local.max_context,  # already capped at spec.max_model_len
        max_num_seqs=max_num_seqs,
        disable_log_stats=True,
    )
    gpu_only = {"tensor_parallel_size": spec.tensor_parallel_size if spec.tensor_parallel_size > 1 else None,
                "gpu_memory_utilization": spec.gpu_memory_utilization}
    given = {k: v for k, v in gpu_only.items() if v is not None}
    if on_cpu:
        if given:
            log.warning("%s: %s ignored on a CPU (multi-GPU engine arguments)", local.name,
                        ", ".join(f"{k}={v}" for k, v in given.items()))
        given = {}
    args.update(given)
    if "gpu_memory_utilization" not in given:
        args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    return args


def _forget_partial_start() -> None:
    """Undo what a failed start left process-wide, so a later engine can start."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    try:
        cleanup_dist_env_and_memory()
    except Exception:  # nothing was initialised: nothing to undo
        pass


def _position_steps(flat: Any, positions: range, token_ids: list[int]) -> list[TokenStep]:
    """TokenSteps from vLLM FlatLogprobs: per position [chosen, top-1, ..., top-k]."""
    steps = []
    for position, token_id in zip(positions, token_ids, strict=True):
        start, end = flat.start_indices[position], flat.end_indices[position]
        steps.append(
            TokenStep(
                token_id=token_id,
                logprob=flat.logprobs[start],
                top_ids=tuple(flat.token_ids[start + 1 : end]),
                top_logprobs=tuple(flat.logprobs[start + 1 : end]),
            )
        )
    return steps


def _generation_payload(out: Any) -> tuple[list[TokenStep], bool]:
    completion = out.outputs[0]
    token_ids = list(completion.token_ids)
    return _position_steps(completion.logprobs, range(len(token_ids)), token_ids), out.finished


def _score_payload(out: Any, n_prompt: int) -> tuple[list[TokenStep], bool]:
    ids = out.prompt_token_ids
    positions = range(n_prompt, len(ids))
    return _position_steps(out.prompt_logprobs, positions, ids[n_prompt:]), True
