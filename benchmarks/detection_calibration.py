"""Calibration for the detection matrix: verification thresholds from measured honest noise,
per model and pinned dtype, and the thresholds file that records them.

The rule depends on how far honest noise sits from the cheats, which the dtype sets:

* float32: every threshold is CALIBRATION_MARGIN x a high quantile of honest noise (p99.9;
  p90 for "suspicious"). Honest fp32 noise is about a thousand times below the subtlest
  cheat, so a wide margin costs no detection.
* bfloat16: honest noise (about 1e-2 nats between engines) is as large as int8 weights'
  error, so a margin would hide every subtle cheat from the epoch test. The per-inference
  limits keep the margin (an honest output must never fail), but the "suspicious" line
  sits where the epoch test's design needs it: SUSPICIOUS_MARGIN x the
  ``1 - honest_suspicious_rate / 2`` quantile of the *worst* honest row (each executor
  runs one configuration, so every configuration, not the pool, must stay under the
  design rate), measured on the length-normalised mean error that ``mean_limit`` judges.
  The small margin covers what a few dozen outputs per row cannot: that quantile is
  their maximum, and prompts shift the noise (SmolLM2: 3 of 25 honest vLLM greedy outputs
  of the evaluation split lay above the unmargined line, none above 1.2x).
  It also measures what the ledger's distance run needs (``honest_distance_spread``):
  the worst honest configuration's mean distance and the widest per-token spread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gonka_p2p.inference.model_names import DEFAULT_DTYPE
from gonka_p2p.inference.verification import Measurements
from gonka_p2p.inference.verification_params import CALIBRATION_MARGIN, ModelThresholds, SprtParams

SUSPICIOUS_MARGIN = 1.2  # bf16: the suspicious line over the worst honest row's p99.5
SHORT_PREFIXES = (1, 4, 16)  # calibration checks the widened mean limits on prefixes this long


def quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.array(values), q, method="higher"))


def honest_distance_spread(rows: dict[str, list[Measurements]]) -> tuple[float, float, int]:
    """The distance run's honest inputs (``ledger/distance_test.py``): over each configuration
    (row and temperature: each executor runs one), the token-weighted mean distance and the
    per-token spread, the sd of one output's mean x sqrt(the mean output length), which keeps
    the correlation between an output's positions; the largest of each (the worst honest
    executor sets the line, as for the suspicious line); and the longest output measured."""
    groups: dict[tuple[str, float], list[Measurements]] = {}
    for row, ms in rows.items():
        for m in ms:
            if m.comparable:
                groups.setdefault((row, m.temperature), []).append(m)
    means, spreads = [], []
    for ms in groups.values():
        tokens = np.array([len(m.position_errors) for m in ms], dtype=float)
        errors = np.array([m.mean_error for m in ms])
        means.append(float(np.sum(errors * tokens) / np.sum(tokens)))
        spreads.append(float(np.std(errors) * math.sqrt(tokens.mean())))
    return max(means), max(spreads), max(len(m.position_errors) for ms in groups.values() for m in ms)


def calibrate(rows: dict[str, list[Measurements]], dtype: str, sprt: SprtParams,
              val_over_gen: float) -> tuple[ModelThresholds, dict[str, Any]]:
    """Thresholds from the honest rows' measurements (see the module docstring for the rule
    per dtype), and the record of what was measured."""
    every = [m for ms in rows.values() for m in ms]
    max_errors = [m.max_error for m in every]
    mean_errors = [m.mean_error for m in every]
    reference = int(np.median([m.n_tokens for m in every]))

    def normalised(m: Measurements) -> float:  # the mean error as mean_limit's widening sees it
        return m.mean_error / math.sqrt(max(1.0, reference / m.n_tokens))

    max_mean = CALIBRATION_MARGIN * quantile(mean_errors, 0.999)
    if dtype == DEFAULT_DTYPE:
        suspicious = CALIBRATION_MARGIN * quantile(mean_errors, 0.9)
    else:
        suspicious = SUSPICIOUS_MARGIN * max(
            quantile([normalised(m) for m in ms], 1.0 - sprt.honest_suspicious_rate / 2) for ms in rows.values())
    # Honest tokens the validator's cut leaves out, as the logprob noise that carries them across it
    # (sampler._filter_margins: a distance c at temperature T is T log(1 + c) / 2 nats). At float32
    # the single-logprob tolerance is that noise's bound already (cut_noise None); at bfloat16 it
    # is hundreds of times the typical noise and would keep every token, so the width is the
    # margin x the widest honest one. When no honest token was cut, the honest tokens' distances
    # from their CDF boundaries stand in: both are how far noise moves a cumulative share of the
    # weights (the mean error would not do: on the tiny model it let every pre-filled token pass).
    cut_noise = [m.temperature * math.log1p(c) / 2 for m in every if m.temperature > 0.0
                 for c in m.cut_margins if math.isfinite(c)]
    boundary_noise = [m.temperature * math.log1p(x) / 2 for m in every if m.temperature > 0.0
                      for x in m.sampling_margins if 0.0 < x < math.inf]
    # The CDF near-tie width of sampled requests, likewise: at bfloat16 the single-logprob
    # tolerance (the noise of tail logprobs) saturated it, and every token passed. And greedy's:
    # a margin of g nats below the top is noise of g / 2 on each of the two logprobs; where no
    # honest greedy token missed the top, the sampled head noise stands in.
    greedy = [x for m in every if m.temperature == 0.0 for x in m.sampling_margins]
    greedy_noise = [x / 2 for x in greedy if 0.0 < x < math.inf]
    fallback = [quantile(mean_errors, 0.999)]

    def widest(noise: list[float]) -> float | None:
        return None if dtype == DEFAULT_DTYPE else CALIBRATION_MARGIN * max(noise)

    # The distance run: where one output's line cannot separate subtle cheats (bf16); at float32
    # the per-output rules reject them outright, and a run would only add risk across hardware.
    distance_run = (None, None, None) if dtype == DEFAULT_DTYPE else honest_distance_spread(rows)

    thresholds = ModelThresholds(
        logprob_tolerance=CALIBRATION_MARGIN * quantile(max_errors, 0.999),
        max_mean_distance=max_mean, suspicious_mean_distance=min(suspicious, max_mean),
        reference_tokens=reference,
        cut_noise=widest(cut_noise or boundary_noise or fallback),
        tie_noise=widest(boundary_noise or fallback),
        greedy_noise=widest(greedy_noise or boundary_noise or fallback),
        honest_distance=distance_run[0], distance_noise=distance_run[1], distance_tokens=distance_run[2])
    sampled = [x for m in every if m.temperature > 0.0 for x in m.sampling_margins]
    measured: dict[str, Any] = {
        "inferences": len(every),
        "honest_rows": sorted(rows),
        "p999_max_error": quantile(max_errors, 0.999),
        "max_max_error": max(max_errors),
        "p999_mean_error": quantile(mean_errors, 0.999),
        "p90_mean_error": quantile(mean_errors, 0.9),
        "max_top_k_shortfall": max(x for m in every for x in m.top_k_shortfall),
        "greedy_positions_not_exact": sum(x > 0 for x in greedy),
        "max_greedy_margin_nats": max(greedy, default=0.0),
        "sampled_positions_not_exact": sum(x > 0 for x in sampled),
        "max_sampled_margin_cdf": max(x for x in [0.0, *sampled] if math.isfinite(x)),
        # claimed tokens outside the validator's nucleus: rejected whatever the tolerance
        "sampled_positions_outside_nucleus": sum(math.isinf(x) for x in sampled),
        "sampled_inferences_outside_nucleus": sum(
            any(math.isinf(x) for x in m.sampling_margins) for m in every if m.temperature > 0.0),
        "sampled_positions_cut_with_weight": len(cut_noise),  # of those, the ones measured at the cut
        "max_cut_noise_nats": max(cut_noise, default=0.0),
        "max_boundary_noise_nats": max(boundary_noise, default=0.0),
        "val_over_gen": val_over_gen,
    }
    for row, ms in sorted(rows.items()):  # the epoch test's honest rate, per configuration
        measured[f"suspicious_share_{row.replace('-', '_')}"] = sum(
            m.mean_error > thresholds.mean_limit(thresholds.suspicious_mean_distance, m.n_tokens)
            for m in ms) / len(ms)
    # Short outputs: the widened mean limits must still hold the honest prefixes' means.
    for n in SHORT_PREFIXES:
        means = [sum(m.position_errors[:n]) / len(m.position_errors[:n]) for m in every]
        measured[f"p999_mean_error_first_{n}"] = quantile(means, 0.999)
        measured[f"mean_limit_first_{n}"] = thresholds.mean_limit(thresholds.max_mean_distance, n)
        measured[f"suspicious_share_first_{n}"] = sum(
            v > thresholds.mean_limit(thresholds.suspicious_mean_distance, n) for v in means) / len(means)
    return thresholds, measured


def merged_table(table: dict[str, Any], model: str, dtype: str, thresholds: ModelThresholds,
                 measured: dict[str, Any]) -> None:
    """Put one (model, dtype)'s calibration into a parsed thresholds ``table``, keeping every
    other model's and dtype's: the model's own table holds DEFAULT_DTYPE, a sub-table each
    other dtype (``verification_params.verification_params_from_obj`` reads it so)."""
    node = table.setdefault("models", {}).setdefault(model, {})
    target = node if dtype == DEFAULT_DTYPE else node.setdefault(dtype, {})
    target.update({k: v for k, v in dataclasses.asdict(thresholds).items() if v is not None})
    target["calibration"] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, **measured}


HEADER = """\
# Verification thresholds per model and pinned dtype, and the epoch test
#   (gonka_p2p/inference/verification_params.py). A model's table holds its float32 values,
#   [models."<model>".<dtype>] another dtype's.
# Written by: OMP_NUM_THREADS=1 python benchmarks/detection_matrix.py --calibrate --write
#   [--dtype bfloat16] --n N --max-tokens 32 (calibration prompt split, disjoint from the
#   evaluation split; N in each calibration's inferences = 8 N). Configuration: weights and
#   compute in the pinned dtype on CPU, torch and vLLM engines as executors, the torch engine
#   (one thread) as validator.
# Rule (benchmarks/detection_calibration.py): thresholds = {margin} x p99.9 of honest noise;
#   suspicious_mean_distance = {margin} x its p90 at float32, and at bfloat16 {suspicious} x the
#   worst honest row's (1 - honest_suspicious_rate / 2) quantile (noise and subtle cheats are
#   close: the epoch test, carried across epochs, separates them). Units: nats.
# The [sprt] rates are design values, not measurements: honest_* are upper bounds
#   above the measured honest rates (see calibration.*), cheat_* the weakest cheat the
#   epoch test is designed for; alpha/beta are per Wald run.
"""


def thresholds_toml(table: dict[str, Any], sprt: SprtParams) -> str:
    """The thresholds file for ``table`` (parsed, merged): values with their units, and under
    each the calibration that chose them."""
    def value(v: object) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v) if isinstance(v, int) else f"{v:.3e}"

    units: dict[str, str] = {f.name: f.metadata["unit"] for f in dataclasses.fields(ModelThresholds)}
    lines = [HEADER.format(margin=CALIBRATION_MARGIN, suspicious=SUSPICIOUS_MARGIN).rstrip("\n"), "", "[sprt]"]
    lines += [f"{f.name} = {getattr(sprt, f.name)!r}  # {f.metadata['unit']}" for f in dataclasses.fields(sprt)]

    def section(name: str, values: dict[str, Any], unit: Callable[[str], str]) -> list[str]:
        return ["", f"[{name}]"] + [f"{k} = {value(v)}{unit(k)}" for k, v in values.items()
                                    if not isinstance(v, dict)]

    for model, node in sorted(table.get("models", {}).items()):
        for prefix, values in [(f'models."{model}"', node)] + [
                (f'models."{model}".{k}', v) for k, v in sorted(node.items())
                if isinstance(v, dict) and k != "calibration"]:
            ordered = {k: values[k] for k in units if k in values} | {k: v for k, v in values.items() if k not in units}
            lines += section(prefix, ordered, lambda k: f"  # {units[k]}" if k in units else "")
            lines += section(f"{prefix}.calibration", values["calibration"], lambda k: "")
    return "\n".join(lines) + "\n"
