"""``gonka-p2p demo``: a local network of real processes serving a real model.

Writes a local network (``gonka-p2p init``: a key per node, one funded
client key, a genesis), starts ``nodes`` participant processes on 127.0.0.1
(each a ``gonka-p2p node`` with its own key, libp2p host, engine and ledger
replica), joined through the first one, then a client that sends chat
requests round-robin through every node's TA, and prints each streamed
answer with a table of who served it and how fast. Round-robin over TAs
guarantees at least two distinct executors, since a TA never executes its
own requests. Every request is paid for on the ledger: the demo waits until
each inference's Start and Finish have committed and settled, and shows the
client's balance before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gonka_p2p.client import Completion, GonkaClient, GonkaError
from gonka_p2p.wire.stream import RequestRejected
from gonka_p2p.gossip.libp2p_service import Libp2pService
from gonka_p2p.identity import Keypair
from gonka_p2p.inference.verification_params import thresholds_table
from gonka_p2p.ledger.devnet import init_local_network
from gonka_p2p.ledger.query import EpochSummaryReply

console = Console()

PROMPTS: list[tuple[str, float]] = [
    ("What is the capital of France? Answer in one sentence.", 0.0),
    ("Write a haiku about peer-to-peer networks.", 0.7),
    ("Give me three tips for writing clear Python code.", 0.0),
    ("Explain in two sentences why the sky is blue.", 0.7),
    ("Name three planets of the solar system.", 0.0),
    ("What does a GPU do, in one sentence?", 0.7),
]

READY_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = 120.0
EMPTY_BLOCK_INTERVAL_S = 2.0
# With --cheater the demo must see whole epochs settle: short epochs, frequent blocks.
CHEATER_GENESIS = {"epoch_length_blocks": 40, "validation_window_blocks": 12,
                   "dispute_voting_blocks": 8, "inference_deadline_blocks": 30}
CHEATER_EMPTY_BLOCK_INTERVAL_S = 1.0
EPOCH_TIMEOUT_S = 300.0
NO_EXECUTOR_RETRIES = 2


@dataclass
class NodeProcess:
    index: int
    key: Keypair
    proc: asyncio.subprocess.Process
    addr: str = ""

    def rss_mib(self) -> float:
        """Resident memory of the node process (Linux /proc), MiB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")


async def _spawn_node(index: int, workdir: Path, genesis: Path, engine: str, model: str,
                      bootstrap: str | None, block_interval: float, cheater: str | None) -> NodeProcess:
    key = Keypair.load(workdir / f"node{index}.key")
    args = [sys.executable, "-m", "gonka_p2p.cli", "node", "--key", str(workdir / f"node{index}.key"),
            "--listen", "/ip4/127.0.0.1/tcp/0", "--engine", engine, "--model", model,
            "--genesis", str(genesis), "--announce-interval", "1.0",
            "--empty-block-interval", str(block_interval)]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    if cheater:  # weight cheats rewrite the model, which only the torch engine allows
        args += ["--cheater", cheater, "--engine", "torch"]
    log = open(workdir / f"node{index}.log", "wb")
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=log)
    return NodeProcess(index, key, proc)


async def _wait_ready(node: NodeProcess, workdir: Path) -> None:
    assert node.proc.stdout is not None
    try:
        while True:
            line = await asyncio.wait_for(node.proc.stdout.readline(), READY_TIMEOUT_S)
            if not line:
                tail = (workdir / f"node{node.index}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"node {node.index} exited before it was ready:\n{tail}")
            if line.startswith(b"READY "):
                node.addr = line.split()[1].decode()
                return
    except TimeoutError:
        raise RuntimeError(f"node {node.index} was not ready after {READY_TIMEOUT_S:.0f} s") from None


async def _wait_for_executors(client: GonkaClient, want: int, model: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await client.network_info()
        if sum(model in models for models in info.values()) >= want:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"TA {client.ta} did not see {want} live executors within {timeout:.0f} s")


async def _ask(client: GonkaClient, prompt: str, temperature: float, model: str,
               max_tokens: int) -> Completion:
    console.print(f"\n[bold cyan]> {prompt}[/bold cyan]  [dim](TA {client.ta[-8:]}, T={temperature})[/dim]")
    for retry in range(NO_EXECUTOR_RETRIES + 1):
        try:
            completion = await client.chat(
                [("user", prompt)], on_text=lambda t: console.print(t, end="", highlight=False, markup=False),
                model=model, max_tokens=max_tokens, temperature=temperature,
                top_p=0.95 if temperature else 1.0,
            )
            break
        except RequestRejected as e:
            # The draw is frozen for the epoch: once the cheater is convicted, a request whose
            # every allowed draw lands on it finds no executor until the next epoch. A new
            # request (new nonce) is drawn afresh; in a 4-node demo this happens to ~4 %.
            if e.code != "no_executor" or retry == NO_EXECUTOR_RETRIES:
                raise
    console.print()
    return completion


def _request_table(i: int, ta: str, c: Completion, cheater: str | None = None) -> Table:
    table = Table(title=f"request {i}", title_justify="left", show_header=True)
    for col in ("executor", "TA", "TTFT (ms)", "tokens/s", "tokens", "finish"):
        table.add_column(col)
    executor = c.executor[-12:] + (" (cheater)" if c.executor == cheater else "")
    table.add_row(executor, ta[-12:], f"{c.ttft_s * 1000:.0f}", f"{c.tokens_per_s:.1f}",
                  str(c.completion_tokens), c.finish_reason)
    return table


async def run_demo(nodes: int, requests: int, engine: str, model: str, max_tokens: int,
                   cheater: str | None = None) -> int:
    """``cheater``: add one participant serving that cheat (``cheats.CHEATS``) and show
    the validators catching it within the epoch."""
    from gonka_p2p.adversary.cheats import CHEATS
    from gonka_p2p.inference.models import resolve_model, served_name

    if nodes < 3:
        console.print("[red]error:[/red] the demo needs at least 3 nodes")
        return 2
    if cheater is not None and cheater not in CHEATS:
        console.print(f"[red]error:[/red] unknown cheat {cheater!r}: choose from {', '.join(CHEATS)}")
        return 2
    honest_nodes, nodes = nodes, nodes + (1 if cheater else 0)
    block_interval = CHEATER_EMPTY_BLOCK_INTERVAL_S if cheater else EMPTY_BLOCK_INTERVAL_S
    started = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(f"preparing model {model} (dequantized once, then cached)")
        model_dir = await asyncio.to_thread(resolve_model, model)
        progress.update(task, description=f"model {model} ready at {model_dir}", completed=1, total=1)
        served = served_name(model)  # what the nodes announce and clients ask for (a directory: its name)

        workdir = Path(tempfile.mkdtemp(prefix="gonka-demo-"))
        network = init_local_network(workdir, nodes=nodes, clients=1, models=(model,),
                                     verification=thresholds_table(), **(CHEATER_GENESIS if cheater else {}))
        genesis = network.genesis_path
        client_key = Keypair.load(network.client_keys[0])

        procs: list[NodeProcess] = []
        client_service = Libp2pService(Keypair.generate(), "/ip4/127.0.0.1/tcp/0")
        try:
            task = progress.add_task(f"starting {nodes} nodes ({engine} engine, loading models)", total=nodes)
            first = await _spawn_node(0, workdir, genesis, engine, model, None, block_interval, None)
            procs.append(first)
            await _wait_ready(first, workdir)
            progress.advance(task)
            rest = [await _spawn_node(i, workdir, genesis, engine, model, first.addr, block_interval,
                                      cheater if i >= honest_nodes else None)
                    for i in range(1, nodes)]
            procs += rest
            for node in rest:
                await _wait_ready(node, workdir)
                progress.advance(task)

            await client_service.start()
            clients = []
            for node in procs:
                ta = await client_service.connect(node.addr)
                clients.append(GonkaClient(client_key, client_service, ta, chain_id=network.genesis.chain_id))
            task = progress.add_task("waiting until every TA sees the executors", total=1)
            for client in clients:
                await _wait_for_executors(client, nodes - 1, served)
            progress.update(task, completed=1)
        except BaseException:
            await _shutdown(procs, client_service)
            raise

    cheater_peer = procs[-1].key.peer_id if cheater else None
    results: list[tuple[str, Completion]] = []
    refunded = 0
    try:
        if cheater:
            with console.status("waiting for epoch 1 (epoch 0 is the bootstrap epoch: validators "
                                "commit their seeds in it)"):
                first_epoch = await _wait_epoch(clients[0], 1)
        balance_before = (await clients[0].balance()).balance
        i = 0
        while i < requests or (cheater and not _served_by_both(results, cheater_peer)
                               and i < 4 * requests):
            prompt, temperature = PROMPTS[i % len(PROMPTS)]
            client = clients[i % len(clients)]
            completion = await _ask(client, prompt, temperature, served, max_tokens)
            results.append((client.ta, completion))
            console.print(_request_table(i + 1, client.ta, completion, cheater_peer))
            i += 1
        with console.status("waiting until every inference is settled on the ledger"):
            costs = await _wait_settled(clients[0], [c for _, c in results])
        if cheater:
            last_epoch = (await clients[0].status()).epoch
            with console.status(f"waiting until epochs {first_epoch}..{last_epoch} are validated "
                                "and settled"):
                summaries = await _wait_epochs_settled(clients[0], first_epoch, last_epoch)
            refunded = sum(s.fees_refunded for s in summaries)
        balance_after = (await clients[0].balance()).balance
        memory = {n.key.peer_id: n.rss_mib() for n in procs}
    except (GonkaError, TimeoutError) as e:
        console.print(f"[red]error:[/red] request failed ({getattr(e, 'code', 'timeout')}): {e}")
        return 1
    finally:
        await _shutdown(procs, client_service)

    _print_summary(results, memory, time.perf_counter() - started)
    fees = len(costs) * network.genesis.params.tx_fee  # each StartInference's fee, paid by its client
    _print_ledger(client_key.peer_id, balance_before, balance_after, costs, fees, refunded)
    if cheater and not _report_verification(summaries, cheater, cheater_peer):  # type: ignore[arg-type]
        return 1
    if balance_before - balance_after != sum(costs) + fees - refunded:
        console.print("[red]error:[/red] the client's balance did not fall by exactly what it was charged")
        return 1
    executors = {c.executor for _, c in results}
    if requests >= 3 and len(executors) < 2:
        console.print("[red]error:[/red] fewer than 2 distinct executors served the requests")
        return 1
    return 0


async def _wait_settled(client: GonkaClient, completions: list[Completion]) -> list[int]:
    """Poll the ledger until every inference has settled (or expired: cost 0); return the costs."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    costs = []
    for completion in completions:
        while (record := await client.inference(completion.inference_id)).status not in ("settled", "expired"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"inference {completion.inference_id.hex()[:12]} is still "
                                   f"{record.status or 'unknown'} on the ledger after {SETTLE_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.5)
        costs.append(record.cost)
    return costs


def _print_ledger(client: str, before: int, after: int, costs: list[int], fees: int, refunded: int) -> None:
    table = Table(title="ledger", title_justify="left")
    for col in ("client", "balance before", "balance after", "charged", "refunded", "inferences settled",
                "transaction fees"):
        table.add_column(col)
    table.add_row(client[-12:], str(before), str(after), str(before - after), str(refunded),
                  f"{len(costs)} (cost {sum(costs)})", str(fees))
    console.print(table)


def _served_by_both(results: list[tuple[str, Completion]], cheater: str | None) -> bool:
    """Enough for the cheater demo: the cheater and some honest executor each served twice."""
    by_cheater = sum(c.executor == cheater for _, c in results)
    return by_cheater >= 2 and len(results) - by_cheater >= 2


async def _wait_epoch(client: GonkaClient, epoch: int) -> int:
    deadline = time.monotonic() + EPOCH_TIMEOUT_S
    while (current := (await client.status()).epoch) < epoch:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ledger did not reach epoch {epoch} in {EPOCH_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.5)
    return current


async def _wait_epochs_settled(client: GonkaClient, first: int, last: int) -> list[EpochSummaryReply]:
    deadline = time.monotonic() + EPOCH_TIMEOUT_S
    summaries = []
    for epoch in range(first, last + 1):
        while not (summary := await client.epoch_summary(epoch)).settled:
            if time.monotonic() > deadline:
                raise TimeoutError(f"epoch {epoch} did not settle in {EPOCH_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.5)
        summaries.append(summary)
    return summaries


def _report_verification(summaries: list[EpochSummaryReply], cheat: str, cheater: str) -> bool:
    """Print each epoch's settlement and whether the cheater was caught while honest work was paid."""
    for summary in summaries:
        console.print(summary.text, highlight=False, markup=False)
    caught = any(cheater in s.caught for s in summaries)
    honest_paid = any(p != cheater for s in summaries for p in s.paid)
    # Caught, it loses the whole epoch (brief, section 1): fees of an epoch whose checks all
    # missed it are paid -- validation is sampled -- but never those of an epoch it was caught in.
    cheater_paid = any(cheater in s.paid and cheater in s.caught for s in summaries)
    table = Table(title=f"verification: one executor cheats ({cheat})", title_justify="left")
    for col in ("cheater", "caught", "its fees", "its clients refunded", "honest executors paid"):
        table.add_column(col)
    table.add_row(cheater[-12:], "yes" if caught else "NO", "paid" if cheater_paid else "forfeited",
                  str(sum(s.fees_refunded for s in summaries)), "yes" if honest_paid else "NO")
    console.print(table)
    if not (caught and honest_paid and not cheater_paid):
        console.print("[red]error:[/red] the cheater was not caught, or honest work was not paid")
        return False
    return True


def _print_summary(results: list[tuple[str, Completion]], memory: dict[str, float], wall: float) -> None:
    table = Table(title="summary", title_justify="left")
    for col in ("participant", "executed", "relayed as TA", "RSS (MiB)"):
        table.add_column(col)
    for peer, rss in memory.items():
        executed = sum(c.executor == peer for _, c in results)
        relayed = sum(ta == peer for ta, _ in results)
        table.add_row(peer[-12:], str(executed), str(relayed), f"{rss:.0f}")
    console.print(table)
    ttfts = sorted(c.ttft_s for _, c in results)
    rates = [c.tokens_per_s for _, c in results]
    console.print(f"demo wall time {wall:.1f} s; TTFT median {ttfts[len(ttfts) // 2] * 1000:.0f} ms; "
                  f"mean {sum(rates) / len(rates):.1f} tokens/s per request; "
                  f"{len({c.executor for _, c in results})} distinct executors")


async def _shutdown(procs: list[NodeProcess], service: Libp2pService) -> None:
    with contextlib.suppress(Exception):
        await service.stop()
    for node in procs:
        if node.proc.returncode is None:
            node.proc.terminate()
    for node in procs:
        try:
            await asyncio.wait_for(node.proc.wait(), 20)
        except TimeoutError:
            node.proc.kill()
            await node.proc.wait()
