"""One participant process: the network service and the actors it holds.

Start-up order is chosen so that the cheap failures come first: key file,
genesis, the served models' files against the genesis pins (hashed once, then
cached), listen address, bootstrap peer -- and only then the seconds-long
model load.
The node prints ``READY <multiaddr>`` on stdout once it serves, its engines
loaded and warmed up (the demo and
tests wait for that line) and shuts down cleanly on SIGINT/SIGTERM: actors
stop, in-flight streams reset, the engine is closed. With ``http`` set it
also serves the OpenAI-compatible gateway in front of its TA; the HTTP port
is bound right after the libp2p one, so a busy port fails start-up early.

With a genesis the node also runs a ledger :class:`Replica` (store under
``config.ledger_dir``, opened -- and recovered -- before the models load; it
catches up with its peers once the node serves). The ledger then decides
what the serving path checks: the TA admits a request only if the client's
available balance covers its escrow and records ``StartInference``; the
executor records ``FinishInference`` (:class:`LedgerHooks`); and the
executor draw uses the participants' weights from the committed state,
refreshed after every block. A node given no genesis file takes the one
saved in its data directory, else asks its bootstrap peers
(``genesis_exchange.py``); every node serves its own to those that join.
Without a genesis (an ad-hoc development network) there is no ledger:
every peer weighs 1 and nothing is charged.

Tasks: every long-lived task of every actor is owned by one
:class:`Supervisor` under :meth:`Node.serve` (``actors/supervisor.py``
says what a crash means). The ledger replica and the HTTP gateway are
critical: a crash stops the node with the error. The announcer, the
validator and the transaction follower are restarted, the crash reported
(logged, and kept in ``node.supervisor.crashes``) while the replica keeps
running. The executor, the TA and the artifact server have no task of
their own: they answer streams, and each stream's work ends with it.

Commit listeners (the weights below, the validator) get the replica's live
committed state, not a copy: they run synchronously after each block and
may read it, never mutate it, and never hold a live view of it (a table, its
rows) across an ``await`` -- only the snapshots its queries return
(``actors/validator.py`` spells out the rule).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace

from gonka_p2p.actors.admission import ADHOC_CHAIN_ID
from gonka_p2p.actors.answer_server import AnswerServer
from gonka_p2p.actors.artifact_server import ArtifactServer
from gonka_p2p.actors.artifact_store import ArtifactStore, EvidenceStoreError
from gonka_p2p.actors.directory import PeerDirectory
from gonka_p2p.actors.executor import ExecutorActor
from gonka_p2p.actors.genesis_exchange import genesis_server, resolve_genesis
from gonka_p2p.actors.ledger_hooks import LedgerHooks
from gonka_p2p.actors.replica import Replica, ReplicaParams
from gonka_p2p.actors.transfer_agent import TransferAgent
from gonka_p2p.actors.supervisor import Supervised, Supervisor
from gonka_p2p.actors.prover import ProverActor
from gonka_p2p.actors.validator import ValidatorActor
from gonka_p2p.config import NodeConfig, parse_http_address
from gonka_p2p.gossip.service import NetworkError, NetworkService
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.engine import Engine
from gonka_p2p.inference.factory import EngineLoader, warm_up
from gonka_p2p.inference.model_identity import ModelMismatch, pinned_name
from gonka_p2p.inference.model_names import DEFAULT_DTYPE
from gonka_p2p.inference.models import ModelSpec
from gonka_p2p.inference.verification_params import (
    VerificationParams,
    load_verification_params,
    verification_params_from_obj,
)
from gonka_p2p.ledger.genesis import Genesis, GenesisError
from gonka_p2p.ledger.state import LedgerState
from gonka_p2p.ledger.store import StoreError
from gonka_p2p.ledger.validators import NoValidators
from gonka_p2p.openai.gateway import Gateway, GatewayServer
from gonka_p2p.wire.protocols import GENESIS_PROTOCOL

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The node cannot start; the message says why, for people."""


def verification_params_of(genesis: Genesis) -> VerificationParams:
    """The thresholds this node's validator judges by: those the genesis pins, so that every
    validator of a network judges alike; the package's calibrated ones for a genesis without."""
    dtypes = {model: pin.dtype for model, pin in genesis.models.items()}
    try:
        if not genesis.verification:
            return load_verification_params(dtypes=dtypes)
        return verification_params_from_obj(genesis.verification, dtypes)
    except (ValueError, TypeError) as e:
        raise GenesisError(f"the genesis verification table: {e}") from None


def model_specs(config: NodeConfig, genesis: Genesis | None) -> list[ModelSpec]:
    """What this node's engines load: each ``--model`` under the name the network serves it as,
    in its pinned dtype, with the operator's engine arguments. A model whose local files differ
    from its pin is a StartupError: it would be judged (and judge others) against another copy."""
    pins = genesis.models if genesis is not None else {}
    specs = []
    for source in config.models:
        try:
            name = pinned_name(source, {model: pin.digest for model, pin in pins.items()})
        except ModelMismatch as e:
            raise StartupError(str(e)) from None
        specs.append(ModelSpec(source, name, pins[name].dtype if name in pins else DEFAULT_DTYPE,
                               config.tensor_parallel_size, config.gpu_memory_utilization,
                               config.max_model_len))
    return specs


class Node:
    """Holds the actors of one participant around one network service."""

    def __init__(
        self,
        config: NodeConfig,
        key: Keypair,
        service: NetworkService,
        weights: Mapping[str, int] | None,
        genesis: Genesis | None = None,
        replica_params: ReplicaParams | None = None,
    ) -> None:
        """``genesis`` turns the ledger on (and its weights then win over ``weights``)."""
        self.config = config
        self.key = key
        self.service = service
        self.supervisor = Supervisor()
        self.engines: dict[str, Engine] = {}
        self.directory = PeerDirectory(
            service, key, models=list(config.models), capacity=config.max_concurrent,
            weights=genesis.weights() if genesis is not None else weights, interval=config.announce_interval,
        )
        self.replica: Replica | None = None
        self.hooks: LedgerHooks | None = None
        self.validator: ValidatorActor | None = None
        self.prover: ProverActor | None = None
        if genesis is not None:
            params = replica_params or ReplicaParams(empty_block_interval_s=config.empty_block_interval)
            self.replica = Replica(service, key, genesis, config.ledger_dir, params)
            self.replica.add_commit_listener(self._ledger_weights)
            self.hooks = LedgerHooks(self.replica, key)
            self.validator = ValidatorActor(service, key, self.engines, verification_params_of(genesis),
                                            genesis.chain_id, self.hooks)
            self.replica.add_commit_listener(self.validator.on_commit)
            self.replica.add_lag_listener(self.validator.note_lagged)
            if genesis.params.poc_enabled and config.models:
                self.prover = ProverActor(key, self.engines, genesis.chain_id, self.hooks,
                                          lambda: service.listen_addrs)
                self.replica.add_commit_listener(self.prover.on_commit)
        hooks = self.hooks
        # Evidence lives beside the ledger that expects it; without a ledger nothing does (memory).
        evidence = config.ledger_dir / "artifacts.sqlite" if genesis is not None else None
        self.artifacts = ArtifactServer(service, key, ArtifactStore(evidence, config.evidence_max_bytes),
                                        ledger=lambda: self.replica.state if self.replica is not None else None)
        self.answers = AnswerServer(service, key, self.artifacts.store, relayed_by=self._relaying_ta)
        if self.replica is not None:
            self.replica.add_commit_listener(self.artifacts.store.on_commit)
        chain_id = genesis.chain_id if genesis is not None else ADHOC_CHAIN_ID
        self.executor = ExecutorActor(service, key, self.engines, self.artifacts.store, chain_id,
                                      config.max_concurrent, on_finished=hooks.on_finished if hooks else None)
        self.ta = TransferAgent(service, key, self.directory, chain_id, admit=hooks.admit if hooks else None,
                                on_start=hooks.on_start if hooks else None, artifacts=self.artifacts.store,
                                attempts=genesis.params.max_executor_attempts if genesis else 3,
                                first_frame_timeout=config.first_frame_timeout, stall_timeout=config.stall_timeout)
        if self.replica is not None:  # both refuse what the committed ledger already started
            self.replica.add_commit_listener(self.executor.on_commit)
            self.replica.add_commit_listener(self.ta.on_commit)
        service.set_stream_handler(GENESIS_PROTOCOL, genesis_server(genesis))  # for nodes that join
        self.gateway: GatewayServer | None = None
        if config.http is not None:
            self.gateway = GatewayServer(Gateway(self.ta, self.directory, recovery_s=config.answer_recovery).app,
                                         *parse_http_address(config.http))

    async def join(self) -> None:
        """Start listening (libp2p, then HTTP) and dial the bootstrap peers (one must answer)."""
        await self.service.start()
        if self.gateway is not None:
            try:
                self.gateway.bind()
            except OSError as e:
                raise StartupError(f"cannot serve HTTP on {self.config.http}: {e.strerror or e}"
                                   ) from None
        errors = []
        for addr in self.config.bootstrap:
            try:
                await self.service.connect(addr)
            except NetworkError as e:
                errors.append(f"{addr}: {e}")
        if self.config.bootstrap and len(errors) == len(self.config.bootstrap):
            raise StartupError("no bootstrap peer is reachable:\n  " + "\n  ".join(errors))
        try:
            await self.artifacts.store.open()
        except EvidenceStoreError as e:
            raise StartupError(str(e)) from None
        if self.replica is not None:
            try:
                await self.replica.open()
            except (StoreError, NoValidators) as e:
                raise StartupError(f"cannot open the ledger in {self.config.ledger_dir}: {e}") from None
            self.service.set_vouched(self._known_to_ledger)
            self._ledger_weights(self.replica.state)
            self.executor.on_commit(self.replica.state)
            self.ta.on_commit(self.replica.state)
            self.artifacts.store.on_commit(self.replica.state)  # epochs that settled while it was down

    def _known_to_ledger(self, peer: str) -> bool:
        """A participant, or an account holding coins: it costs stake or coins to be one, so these
        keep their share of inbound streams however many keys strangers make (gossip/inbound.py).
        Called from the network thread; it reads two in-memory tables. Installed once the replica is open."""
        assert self.replica is not None
        state = self.replica.state
        return state.participant(peer) is not None or state.balance(peer) > 0

    def _relaying_ta(self, inference_id: bytes) -> str | None:
        """The TA the committed ledger names for ``inference_id`` (None: no ledger, or no record)."""
        record = self.replica.state.inference(inference_id) if self.replica is not None else None
        return record.ta if record is not None else None

    def _ledger_weights(self, state: LedgerState) -> None:
        """The executor draw follows the weights the ledger holds now."""
        self.directory.weights = state.weights()

    async def load_engines(self, loader: EngineLoader, specs: Sequence[ModelSpec],
                           progress: Callable[[str], None]) -> None:
        """Load each served model (a ``--cheater`` node's loader wraps each in its cheat), then
        warm it up (:func:`~gonka_p2p.inference.factory.warm_up`): READY comes after, so no
        client's first request pays for the engine's first use. ``progress`` hears each step."""
        for spec in specs:
            progress(f"loading {spec.served_as} ({self.config.engine} engine)")
            engine = await asyncio.to_thread(loader, self.config.engine, spec)
            self.engines[spec.served_as] = engine
            progress(f"warming up {spec.served_as}: a seeded generation, a score, a proof-of-compute nonce")
            log.info("%s warmed up in %.1f s", spec.served_as, await warm_up(engine))

    async def start_actors(self) -> None:
        await self.directory.start()
        self.artifacts.start()
        self.answers.start()
        self.executor.start()
        self.ta.start()

    def supervised(self) -> list[Supervised]:
        """This node's long-lived actors and what a crash of each means (see the module doc)."""
        actors = [Supervised("network", self.service.wait_closed, critical=True),  # a gossip handler's crash
                  Supervised("announcer", self.directory.run, critical=False)]
        if self.replica is not None and self.hooks is not None and self.validator is not None:
            actors += [Supervised("ledger replica", self.replica.run, critical=True),
                       Supervised("transaction follower", self.hooks.run, critical=False),
                       Supervised("validator", self.validator.run, critical=False)]
        if self.prover is not None:
            actors.append(Supervised("prover", self.prover.run, critical=False))
        if self.gateway is not None:  # its stop returns once in-flight answers end (or their grace does)
            actors.append(Supervised("HTTP gateway", self.gateway.serve, critical=True,
                                     stop=self.gateway.stop))
        return actors

    async def serve(self, stop: asyncio.Event) -> None:
        """Run the actors until ``stop`` is set; raises if a critical one crashes."""
        await self.start_actors()
        await self.supervisor.run(self.supervised(), stop)

    async def close(self) -> None:
        if self.gateway is not None:
            self.gateway.close()
        for engine in self.engines.values():
            await engine.close()
        if self.replica is not None:
            await self.replica.close()
        await self.service.stop()
        await self.artifacts.store.close()  # after the streams that put into it have ended


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def run_node(
    config: NodeConfig,
    service_factory: Callable[[Keypair, str], NetworkService],
    engine_loader: EngineLoader,
    genesis: Genesis | None,
    on_ready: Callable[[Node], None],
    on_progress: Callable[[str], None] = log.info,
) -> None:
    """The whole life of a node process; StartupError (or GenesisError) for anything a person must fix.

    ``genesis``: the ``--genesis`` file's; without one the node looks further (``genesis_exchange``).
    ``on_progress`` hears each step of the seconds-long start (model loads, warm-ups)."""
    key = Keypair.load_or_create(config.key)
    genesis = await resolve_genesis(config, genesis, service_factory)
    specs = await asyncio.to_thread(model_specs, config, genesis)
    config = replace(config, models=[spec.served_as for spec in specs])  # what it announces and serves
    service = service_factory(key, config.listen)
    node = Node(config, key, service, None, genesis)
    stop = asyncio.Event()
    install_stop_signals(stop)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(node.close)
        await node.join()
        await node.load_engines(engine_loader, specs, on_progress)
        on_ready(node)
        await node.serve(stop)
