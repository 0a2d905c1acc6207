"""The epoch test's runs apart: how often the flag run, the distance run (``ledger/distance_test.py``)
and both together accuse, carried over chains of epochs resampled from the detection matrix's
cached records (``detection_matrix.py`` writes them; nothing runs a model here).

    OMP_NUM_THREADS=1 python benchmarks/distance_run_rates.py --dtype bfloat16 --chains 5000

Per model, row and mode: the share of epochs each run accuses (chains of ``--chain`` epochs of
``--epoch-size`` checked inferences, the matrix's seeds), so that the distance run's own cost
to honest executors is measured beside what it adds against subtle cheats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from detection_matrix import RESULTS, measurements, seed_of
from detection_stats import Checked, carried_accusations, checked, epochs_to_catch, resampled_epochs
from rich.console import Console
from rich.table import Table

from gonka_p2p.inference import verification
from gonka_p2p.inference.verification import Evidence
from gonka_p2p.inference.verification_params import load_verification_params
from gonka_p2p.ledger.devnet import distance_test_of


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--rows", nargs="+", default=["honest-torch", "honest-threads", "honest-vllm",
                                                       "honest-vllm-batch", "int8", "fp8"])
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--chain", type=int, default=20)
    parser.add_argument("--epoch-size", type=int, default=30)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--split", default="evaluation", choices=("evaluation", "calibration"),
                        help="whose records: the calibration split holds honest rows only")
    args = parser.parse_args(argv)
    table = Table("model", "row", "mode", "n", "flag run", "distance run", "both", "both: caught within",
                  title=f"Carried epochs accused, {args.chains} chains of {args.chain} epochs of {args.epoch_size}")
    for model in args.models:
        params = load_verification_params(dtypes={model: args.dtype})
        thresholds = params.for_model(model)
        test = distance_test_of(thresholds)
        if test is None:
            raise SystemExit(f"{model} at {args.dtype}: its thresholds calibrate no distance run")
        for row in args.rows:
            paths = sorted((args.results / "rows").glob(f"{model}-{args.dtype}-{args.split}-{row}-t*.json"))
            if not paths:
                raise SystemExit(f"no {args.split} records for {model} {row} at {args.dtype} in "
                                 f"{args.results / 'rows'}: run detection_matrix.py first")
            records = json.loads(paths[-1].read_text())
            for mode in dict.fromkeys(r["mode"] for r in records):
                judged = [r | dataclasses.asdict(verification.judge(measurements(r), thresholds))
                          for r in records if r["mode"] == mode]
                both = [checked(r, test) for r in judged]
                runs = {"flag run": [Checked(c.evidence) for c in both],
                        "distance run": [Checked(Evidence.CLEAN, c.distance_llr) for c in both], "both": both}
                seed = seed_of(model, args.dtype, row, mode)
                cells, within = [], None
                for name, outcomes in runs.items():
                    rate, first = carried_accusations(
                        [resampled_epochs(outcomes, args.epoch_size, args.chain, seed + c)
                         for c in range(args.chains)], params)
                    cells.append(f"{100 * rate:.3f}%")
                    within = epochs_to_catch(first)
                table.add_row(model, row, mode, str(len(judged)), *cells,
                              "-" if row.startswith("honest") else f"{within} epochs" if within else "not within")
    Console(width=160).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
