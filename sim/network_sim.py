"""The researchers' simulator: many peers, honest and cheating, on the real ledger state machine.

``python -m sim.network_sim --seed 7 --peers 50 --epochs 20 --out runs/sim-7``

runs a network of ``--peers`` participants (weights 5..20, one of each
cheating strategy by default, the rest honest) serving ``--requests``
client requests per epoch for ``--epochs`` epochs, on virtual time (blocks),
and drives every inference, check, dispute vote, seed commitment and reveal
through real signed transactions applied by
:func:`gonka_p2p.ledger.state.apply_block` (see :mod:`sim.world`). The model
is skipped: a check's verdict is drawn from per-strategy rates measured in
``benchmarks/results/detection_matrix.json`` (``--verdicts matrix``, the
default) or the design targets (``--verdicts design``); see
:mod:`sim.verdicts`.

It prints, as tables, per strategy: detection (epochs the ledger sanctioned
/ epochs the peer offended), time to catch in blocks and epochs, reward per
unit weight against honest peers and accusations; for the network:
throughput, verification overhead (checks and votes per inference, and the
share of compute they take), latency, disputes, honest peers accused and
convicted, reward fairness among honest peers, and coin conservation
(asserted at every block). It writes ``report.json`` and four PNG plots to
``--out``. The same seed and flags replay bit for bit (the ``digest`` line).

Strategies (``--mix int4=1,lazy=2``, or ``--mix none`` for an honest network):
honest; int4, prefill, small-model (gross cheats); int8, bf16 (subtle
cheats); lazy (a validator that skips its duties and votes); colluding (a
validator that passes every inference of its partner, the heaviest gross
cheater); silent (an executor that drops ``--silent-rate`` of its requests).
Cheaters cheat from epoch ``--cheat-from`` (epoch 0's validators are the
peers whose seed commitments the genesis holds, as ``gonka-p2p init`` writes
them, so cheating from epoch 0 is caught in epoch 0 too). By default every check of an inference finds the same verdict (a
deterministic re-run over the same evidence); ``--independent-checks``
draws each check and dispute vote afresh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gonka_p2p.ledger.genesis import GenesisError, Params

from sim.plots import write_plots
from sim.render import print_report
from sim.roster import DEFAULT_MIX, Strategy
from sim.verdicts import DEFAULT_MATRIX, design_table, load_matrix
from sim.world import GENERATION_BLOCKS, SimConfig, Simulation


class UsageError(Exception):
    """The command line asks for a run that cannot be simulated; the message says why."""


def parse_mix(text: str) -> dict[Strategy, int]:
    """``int4=1,lazy=2`` -> counts per strategy; ``none`` -> an honest network."""
    if text.strip() == "none":
        return {}
    mix: dict[Strategy, int] = {}
    for part in text.split(","):
        name, _, count = part.partition("=")
        try:
            strategy = Strategy(name.strip())
        except ValueError:
            choices = ", ".join(s for s in Strategy if s is not Strategy.HONEST)
            raise UsageError(f"--mix: unknown strategy {name.strip()!r} (choose from {choices})") from None
        if strategy is Strategy.HONEST:
            raise UsageError("--mix: honest peers are the rest; name only the others")
        if not count.strip().isdigit():
            raise UsageError(f"--mix: {part!r} needs a count, as in {strategy}=1")
        mix[strategy] = int(count)
    return mix


def check_config(config: SimConfig) -> None:
    """Refuse, with a reason, any run whose numbers the ledger or the loop cannot honour."""
    params = Params(price_per_token={"m": 1}, epoch_length_blocks=config.epoch_blocks)
    cheaters = sum(config.mix.values())
    problems = []
    if config.peers < 3:
        problems.append("--peers must be at least 3 (a TA, an executor and a validator)")
    if cheaters >= config.peers:
        problems.append(f"--mix names {cheaters} non-honest peers; --peers {config.peers} leaves no honest one")
    if config.epochs < 1:
        problems.append("--epochs must be at least 1")
    if config.requests < 0 or config.clients < 1:
        problems.append("--requests must be >= 0 and --clients >= 1")
    if not 0 <= config.latency < min(params.dispute_voting_blocks, params.validation_window_blocks):
        problems.append(f"--latency must be in [0, {params.dispute_voting_blocks}) blocks, so that a "
                        "dispute vote lands before its deadline")
    if config.epoch_blocks < params.settlement_delay_blocks:
        problems.append(f"--epoch-blocks must be at least {params.settlement_delay_blocks} (validation "
                        "window + dispute voting: an epoch settles before the next one ends)")
    elif config.epoch_blocks <= GENERATION_BLOCKS[1] + 2 * config.latency + 1:
        problems.append("--epoch-blocks leaves no room for a request to finish within its epoch")
    if not (0.0 <= config.churn <= 1.0 and 0.0 <= config.silent_rate <= 1.0):
        problems.append("--churn and --silent-rate are probabilities in [0, 1]")
    if config.cheat_from < 0:
        problems.append("--cheat-from must be >= 0")
    if problems:
        raise UsageError("; ".join(problems))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sim.network_sim",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    defaults = SimConfig(seed=0)
    parser.add_argument("--seed", type=int, default=7, help="the one source of randomness (default 7)")
    parser.add_argument("--peers", type=int, default=defaults.peers, help="participants (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="(default %(default)s)")
    parser.add_argument("--requests", type=int, default=defaults.requests,
                        help="client requests per epoch (default %(default)s)")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="(default %(default)s)")
    parser.add_argument("--epoch-blocks", type=int, default=Params().epoch_length_blocks,
                        help="blocks per epoch (default: the ledger's, %(default)s)")
    parser.add_argument("--latency", type=int, default=defaults.latency,
                        help="max blocks a message takes to reach the ledger (default %(default)s)")
    parser.add_argument("--churn", type=float, default=defaults.churn,
                        help="chance an honest peer leaves at an epoch boundary (default %(default)s)")
    parser.add_argument("--silent-rate", type=float, default=defaults.silent_rate,
                        help="share of its requests a silent executor drops (default %(default)s)")
    parser.add_argument("--cheat-from", type=int, default=defaults.cheat_from,
                        help="first epoch in which cheaters cheat (default %(default)s)")
    parser.add_argument("--mix", default=",".join(f"{s}={n}" for s, n in DEFAULT_MIX.items()),
                        help="non-honest peers, as strategy=count,... or 'none' (default: one of each)")
    parser.add_argument("--independent-checks", action="store_true",
                        help="each check and vote draws its own verdict (default: one per inference, "
                             "as a deterministic re-run over the same evidence)")
    parser.add_argument("--verdicts", choices=("matrix", "design"), default="matrix",
                        help="verdict rates: measured detection matrix, or the design targets")
    parser.add_argument("--matrix", type=Path, default=DEFAULT_MATRIX, help="detection matrix JSON")
    parser.add_argument("--matrix-model", default=None, help="the matrix's model (default: most rows)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/sim-SEED)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    if args.verdicts == "design":
        verdicts = design_table()
    else:
        try:
            verdicts = load_matrix(args.matrix, args.matrix_model)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--matrix {args.matrix}: {e} (or use --verdicts design)") from None
    config = SimConfig(seed=args.seed, peers=args.peers, epochs=args.epochs, requests=args.requests,
                       clients=args.clients, epoch_blocks=args.epoch_blocks, latency=args.latency,
                       churn=args.churn, silent_rate=args.silent_rate, cheat_from=args.cheat_from,
                       independent_checks=args.independent_checks,
                       mix=parse_mix(args.mix), verdicts=verdicts)
    check_config(config)
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    console.width = max(console.width, 100)  # the per-strategy table needs 100 columns (pipes: 80)
    try:
        config = config_from_args(args)
        simulation = Simulation(config)
    except (UsageError, GenesisError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    out = args.out or Path("runs") / f"sim-{config.seed}"
    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("blocks"),
                  TimeElapsedColumn(), console=console, disable=args.quiet, transient=True) as progress:
        task = progress.add_task("blocks", total=simulation.last_height)
        report = simulation.run(lambda height: progress.update(task, completed=height))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json() + "\n")
    write_plots(report, out)
    print_report(report, console, str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
