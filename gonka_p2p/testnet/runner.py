"""Run a testnet: namespaces, participant processes, load, perturbations, then the verdict.

:func:`run` is the whole life of one run, in order: refuse early without the
privilege; remove what a crashed earlier harness left (namespaces with our
prefix, and the processes in them); ``gonka-p2p init`` the genesis (with the
manifest's weights); one namespace per participant plus one for the load
client and one for the observer (and one, with a fresh key, for each
participant a ``join`` will start); start the genesis participants; start
the observer and the load; apply the perturbations at their times (every
random choice was made from the manifest's seed when it was loaded); stop the load, let
the ledger settle, stop the participants, replay their stores, and judge
(:mod:`gonka_p2p.testnet.invariants`). Whatever happens -- an exception, ^C,
SIGTERM -- the ``finally`` and an ``atexit`` hook kill every process we
started and delete every namespace (:func:`netns.cleanup`).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gonka_p2p.identity import Keypair
from gonka_p2p.ledger.genesis import load_genesis, save_genesis
from gonka_p2p.testnet import netns
from gonka_p2p.testnet.invariants import Applied, Verdict, judge, read_jsonl, replay_store
from gonka_p2p.testnet.manifest import Manifest, Perturbation

PORT = 9000
HTTP_PORT = 8000  # every participant's OpenAI gateway
READY_TIMEOUT_S = 300.0  # a model load on a busy machine
ERROR_LINE = re.compile(r"[\w.]*(Error|Exception|ExceptionGroup): ")  # "pkg.SomeError: why", as a traceback ends


class TestnetError(Exception):
    """A run that could not be carried out (as opposed to one whose invariants failed)."""


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


@dataclass
class Participant:
    index: int
    host: netns.Host
    key: Path
    peer_id: str
    log_dir: Path
    proc: subprocess.Popen[str] | None = None
    frozen: bool = False
    starts: int = 0
    meant_down: bool = False  # we killed or stopped it: its exit is not a crash
    joiner: bool = False  # not in the genesis: started by a join, with --bootstrap only
    left: bool = False  # stopped for good by a leave
    via: str = ""  # behind a NAT: the relay (its address) whose circuit the others are given

    @property
    def live(self) -> bool:
        """Started and not gone for good: what rolling restarts and bootstrap lists cover."""
        return self.proc is not None and not self.left

    @property
    def addr(self) -> str:
        """Where the others dial it: behind a NAT, the circuit through ``via``."""
        if self.via:
            return f"{self.via}/p2p-circuit/p2p/{self.peer_id}"
        return f"/ip4/{self.host.ip}/tcp/{PORT}/p2p/{self.peer_id}"

    @property
    def http_url(self) -> str:
        """Its OpenAI gateway; none behind a NAT (HTTP has no relay)."""
        return "" if self.via else f"http://{self.host.ip}:{HTTP_PORT}/v1"

    def start(self, manifest: Manifest, genesis: Path, bootstrap: list[str]) -> None:
        """A joiner is given no genesis: it fetches it from ``bootstrap`` once and keeps it in its data dir."""
        self.starts += 1
        argv = self.host.exec_argv() + _python(
            "gonka_p2p.cli", "--log-level", "info", "node", "--engine", manifest.engine, "--model", manifest.model,
            "--key", str(self.key), "--listen", f"/ip4/{self.host.ip}/tcp/{PORT}",
            "--http", f"{self.host.ip}:{HTTP_PORT}", "--stall-timeout", str(manifest.stall_timeout_s),
            "--first-frame-timeout", str(manifest.stall_timeout_s), "--answer-recovery", str(manifest.load.recovery_s),
            "--empty-block-interval", str(manifest.empty_block_interval), "--announce-interval", "2")
        if not self.joiner:
            argv += ["--genesis", str(genesis)]
        if self.via:
            argv += ["--behind-nat"]  # its bootstrap peers relay for it
        for addr in bootstrap:
            argv += ["--bootstrap", addr]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        self.frozen = self.meant_down = False

    @property
    def log(self) -> Path:
        return self.log_dir / f"node{self.index}.{self.starts}.log"

    def crashed(self) -> str | None:
        """Why the process exited on its own (its log's last error line, else its last line), once;
        None while it runs or when meant. A traceback group ends in frame lines, not in its error."""
        if self.proc is None or self.meant_down or self.proc.poll() is None:
            return None
        self.meant_down = True  # reported once
        lines = [line.strip(" |") for line in self.log.read_text(errors="replace").splitlines() if line.strip(" |+-")]
        last = ([line for line in lines if ERROR_LINE.match(line)] or lines)[-1:]
        return f"participant {self.index} exited with {self.proc.returncode}: {''.join(last)[:160]} ({self.log})"

    def wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY "):
                threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep the pipe drained
                return
            if not line and self.proc.poll() is not None:
                break
        if not self.meant_down:  # else we stopped it meanwhile: nothing to report
            self.meant_down = True
            raise TestnetError(f"participant {self.index} did not start; see {self.log}")

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.meant_down = True
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Testnet:
    manifest: Manifest
    workdir: Path
    participants: list[Participant] = field(default_factory=list)
    helpers: list[subprocess.Popen[str]] = field(default_factory=list)
    client: netns.Host | None = None
    observer: netns.Host | None = None
    applied: list[Applied] = field(default_factory=list)
    process_failures: list[str] = field(default_factory=list)  # crashes and failed restarts

    @property
    def net(self) -> Path:
        return self.workdir / "net"

    def up(self) -> None:
        netns.require_privilege()
        netns.cleanup()
        atexit.register(netns.cleanup)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the finally blocks
        self.workdir.mkdir(parents=True, exist_ok=True)
        m = self.manifest
        init = subprocess.run(_python("gonka_p2p.cli", "init", "--nodes", str(m.nodes), "--clients", "2",
                                      "--model", m.model, "--epoch-length", str(m.epoch_length), "--out", str(self.net),
                                      *(["--proof-of-compute"] if m.proof_of_compute else [])),
                              capture_output=True, text=True)
        if init.returncode != 0:
            raise TestnetError(f"gonka-p2p init failed: {init.stderr.strip()}")
        if m.weights and not m.proof_of_compute:
            genesis = load_genesis(self.net / "genesis.toml")
            save_genesis(replace(genesis, participants=tuple(
                replace(p, weight=w) for p, w in zip(genesis.participants, self.manifest.weights))),
                self.net / "genesis.toml")
        netns.create_hub()
        self.client = netns.create_host("client", 2)
        self.observer = netns.create_host("observer", 3)
        for i in range(m.nodes + m.joiners):
            key = self.net / f"node{i}.key"
            if i >= m.nodes:  # a stranger's key, written now so its address is known to the helpers
                Keypair.generate().save(key)
            host = (netns.create_natted_host(f"node{i}", 10 + i, i) if i in m.nat
                    else netns.create_host(f"node{i}", 10 + i))
            self.participants.append(Participant(i, host, key, Keypair.load(key).peer_id, self.workdir,
                                                 joiner=i >= m.nodes))
        first, *rest = self.participants[:m.nodes]
        for p in rest:
            p.via = first.addr if p.index in m.nat else ""  # first: its relay from the start
        first.start(self.manifest, self.net / "genesis.toml", [])
        first.wait_ready()
        for p in rest:
            p.start(self.manifest, self.net / "genesis.toml", [first.addr])
        for p in rest:
            p.wait_ready()

    def restart(self, p: Participant, wait: bool) -> None:
        """Start ``p`` again through the others; one that cannot start is a finding, not the run's end.
        Without ``wait`` it is awaited in a thread, so that a slow start (a model load on a busy
        machine) does not hold up the perturbations scheduled after it."""
        p.start(self.manifest, self.net / "genesis.toml",
                [q.addr for q in self.participants if q is not p and q.live and not q.frozen])
        if wait:
            self._await_ready(p)
        else:
            threading.Thread(target=self._await_ready, args=(p,), daemon=True).start()

    def _await_ready(self, p: Participant) -> None:
        try:
            p.wait_ready()
        except TestnetError as e:
            self.process_failures.append(str(e))

    def notice_crashes(self) -> None:
        self.process_failures += [c for c in (p.crashed() for p in self.participants) if c]

    def helper(self, host: netns.Host, module: str, *args: str, **config: object) -> subprocess.Popen[str]:
        path = self.workdir / f"{module.rsplit('.', 1)[-1]}-{args[0] if args else 'run'}.json"
        path.write_text(json.dumps({"ip": host.ip, "addrs": [p.addr for p in self.participants],
                                    "http": [p.http_url for p in self.participants],
                                    "chain_id": load_genesis(self.net / "genesis.toml").chain_id, **config}))
        proc = subprocess.Popen(host.exec_argv() + _python(module, *args, str(path)), text=True,
                                stderr=open(self.workdir / f"{path.stem}.log", "w"))
        self.helpers.append(proc)
        return proc

    def down(self) -> None:
        for proc in self.helpers:
            if proc.poll() is None:
                proc.kill()
        for p in self.participants:
            p.stop()
        netns.cleanup()

    # ---- perturbations -------------------------------------------------------------

    def apply(self, pert: Perturbation) -> None:
        targets = [self.participants[i] for i in pert.targets]
        if pert.kind == "kill":
            for p in targets:
                p.meant_down = True
                p.signal(signal.SIGKILL)
                assert p.proc is not None
                p.proc.wait()
        elif pert.kind == "freeze":
            for p in targets:
                p.signal(signal.SIGSTOP)
                p.frozen = True
        elif pert.kind == "partition":
            others = [p for p in self.participants if p not in targets]
            for p in targets:
                netns.isolate(p.host, [q.host for q in others])
            for q in others:
                netns.isolate(q.host, [p.host for p in targets])
        elif pert.kind == "drop":
            for p in targets:
                netns.drop_share(p.host, pert.share)
        elif pert.kind == "bandwidth":
            for p in targets:
                netns.cap_bandwidth(p.host, pert.rate_kbit)
        elif pert.kind == "rolling":
            for p in [p for p in self.participants if p.live]:
                self.notice_crashes()  # before stop() makes an exit look meant
                p.stop()
                self.restart(p, wait=True)  # one at a time: the next stops only once this one serves
        elif pert.kind == "join":
            for p in targets:
                self.restart(p, wait=False)  # its first start: bootstrap addresses only, no genesis file
        elif pert.kind == "leave":
            for p in targets:
                self.notice_crashes()
                p.stop()
                p.left = True

    def undo(self, pert: Perturbation) -> None:
        targets = [self.participants[i] for i in pert.targets]
        if pert.kind == "kill":
            for p in targets:
                self.restart(p, wait=False)
        elif pert.kind == "freeze":
            for p in targets:
                p.signal(signal.SIGCONT)
                p.frozen = False
        elif pert.kind in ("partition", "drop"):
            for p in self.participants:
                netns.clear_rules(p.host)
        elif pert.kind == "bandwidth":
            for p in targets:
                netns.uncap_bandwidth(p.host)

    def perturb(self, t0: float, log: Callable[[str], object]) -> None:
        """Apply and undo the manifest's perturbations at their times, one at a time, in order."""
        events = sorted([(p.at_s, 0, i) for i, p in enumerate(self.manifest.perturbations)]
                        + [(p.end_s, 1, i) for i, p in enumerate(self.manifest.perturbations) if not p.forever])
        started: dict[int, float] = {}
        for at, undo, i in events:
            pert = self.manifest.perturbations[i]
            time.sleep(max(0.0, t0 + at - time.time()))
            self.notice_crashes()
            if undo:
                self.undo(pert)
                self.applied.append(Applied(pert, started[i], time.time()))
                log(f"t+{time.time() - t0:5.0f} s  undone  {pert.kind} {list(pert.targets) or 'all'}")
            else:
                started[i] = time.time()
                log(f"t+{time.time() - t0:5.0f} s  apply   {pert.kind} {list(pert.targets) or 'all'}")
                self.apply(pert)
        self.applied += [Applied(self.manifest.perturbations[i], started[i], None)
                         for i, p in enumerate(self.manifest.perturbations) if p.forever]

    # ---- the run -------------------------------------------------------------------

    def run(self, log: Callable[[str], object]) -> Verdict:
        m = self.manifest
        assert self.client is not None and self.observer is not None
        observe_key, load_key = str(self.net / "client1.key"), str(self.net / "client0.key")
        watch = self.helper(self.observer, "gonka_p2p.testnet.observer", "watch", key=observe_key,
                            out=str(self.workdir / "observed.jsonl"), interval=1.0)
        load = self.helper(self.client, "gonka_p2p.testnet.load", key=load_key,
                           out=str(self.workdir / "requests.jsonl"),
                           rate=m.load.rate, duration_s=m.duration_s, model=m.model, max_tokens=m.load.max_tokens,
                           idle_s=m.load.idle_s, timeout_s=m.load.timeout_s, concurrency=m.load.concurrency,
                           http_share=m.load.http_share, recovery_s=m.load.recovery_s, tas=list(range(m.nodes)),
                           leaves={ta: p.at_s for p in m.perturbations if p.kind == "leave" for ta in p.targets})
        t0 = time.time()
        log(f"load started: {m.load.rate} requests/s for {m.duration_s:g} s")
        self.perturb(t0, log)
        load.wait(timeout=max(0.0, t0 + m.duration_s - time.time()) + m.load.timeout_s + m.load.recovery_s + 60)
        log("load done; settling the ledger")
        settle = self.helper(self.observer, "gonka_p2p.testnet.observer", "settle", key=observe_key,
                             requests=str(self.workdir / "requests.jsonl"), out=str(self.workdir / "settled.json"),
                             settle_s=m.settle_s)
        try:
            settle.wait(timeout=m.settle_s + 120)
        except subprocess.TimeoutExpired:  # no ledger answered: what it did settle is judged as it stands
            settle.kill()
            log(f"the observer could not settle the ledger within {m.settle_s + 120:g} s")
        watch.terminate()
        watch.wait(timeout=30)
        self.notice_crashes()
        for p in self.participants:
            p.stop()
        genesis = load_genesis(self.net / "genesis.toml")
        answers: dict[str, dict[str, Any]] = {}  # what each settled inference committed, from every store
        checks: set[tuple[str, str]] = set()  # every committed validation, from every store
        standing: dict[str, dict[str, int]] = {}  # every participant's record, from the longest store
        stores = {p.index: asyncio.run(replay_store(p.key.parent / f"{p.key.name}-ledger" / "ledger.sqlite", genesis,
                                                    answers, checks, standing))
                  for p in self.participants if p.proc is not None}
        settled_path = self.workdir / "settled.json"
        settled = json.loads(settled_path.read_text()) if settled_path.exists() else {}
        return judge(read_jsonl(self.workdir / "observed.jsonl"), read_jsonl(self.workdir / "requests.jsonl"),
                     settled, self.applied, stores, m.recovery_bound_s, self.process_failures, answers,
                     [p.peer_id for p in self.participants], m.nat, checks, standing)
