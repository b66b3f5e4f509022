"""The lift study's report: `lift.json` (every run and every summary), `lift.md` (mean ± std tables, the
targets, the ablations, time and machine load) and `lift.png` (probe curves and F1 against label budget).

Statistics: a cell is the mean ± sample std (ddof=1) over folds x seeds; a lift or an ablation effect is the
mean ± std of the *paired* differences (same fold, seed and label subset), which removes the variance the two
sides share. Probe figures come from the pretraining's `evals.jsonl` (the probes of every fold's train -> test
split, evaluators/probes.py): step 0 is the random initialisation, the last line the pretrained encoder.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from usf_mae_jax.core import files

# The targets (docs/transfer_study.md): at the smallest label budget, full fine-tuning from the plain
# arm beats scratch by 0.10 macro-F1; the ridge probe of the pretrained encoder beats step 0 by 0.15.
FINETUNE_LIFT_TARGET, PROBE_LIFT_TARGET = 0.10, 0.15
PROBES = ("ridge", "knn")


def read_probe_curve(workdir: str) -> dict[str, Any]:
    """{"steps": [...], "<probe>_<metric>": [[value per fold] per step]} from a pretraining's evals.jsonl."""
    path = os.path.join(workdir, "evals.jsonl")
    if not os.path.isfile(path):
        return {"steps": []}
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    curve: dict[str, Any] = {"steps": [e["step"] for e in lines]}
    for probe in PROBES:
        for metric in ("accuracy", "f1_macro"):
            suffix = f"/{probe}_{metric}"
            curve[f"{probe}_{metric}"] = [[v for k, v in sorted(e.items()) if k.endswith(suffix)] for e in lines]
    return curve


def mean_std(values) -> tuple[float, float, int]:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0, int(values.size)


def fmt(stats: tuple[float, float, int] | tuple, signed: bool = False) -> str:
    if not stats or stats[2] == 0:
        return "–"
    mean, std, _ = stats
    return f"{mean:+.3f} ± {std:.3f}" if signed else f"{mean:.3f} ± {std:.3f}"


def _values(runs: list[dict], init: str, mode: str, budget: float, metric: str = "f1_macro") -> dict:
    return {(r["fold"], r["seed"]): r[metric] for r in runs
            if r["init"] == init and r["mode"] == mode and r["budget"] == budget}


def paired(runs: list[dict], a: str, b: str, mode: str, budget: float) -> tuple[float, float, int]:
    """mean ± std of (a - b) over the (fold, seed) pairs both have."""
    first, second = _values(runs, a, mode, budget), _values(runs, b, mode, budget)
    return mean_std([first[k] - second[k] for k in first if k in second])


def summarize(settings: dict, runs: list[dict], probes_by_arm: dict[str, dict]) -> dict[str, Any]:
    arms, budgets = settings["arms"], settings["budgets"]
    cells = {f"{init}/{mode}/{budget}": mean_std(_values(runs, init, mode, budget).values())
             for init in ["scratch", *arms] for mode in ("full", "linear") for budget in budgets}
    lifts = {f"{arm}/{mode}/{budget}": paired(runs, arm, "scratch", mode, budget)
             for arm in arms for mode in ("full", "linear") for budget in budgets}
    ablations = {f"{arm}/{mode}/{budget}": paired(runs, arm, "plain", mode, budget)
                 for arm in arms[1:] for mode in ("full", "linear") for budget in budgets}
    probe_stats = {}
    for arm, curve in probes_by_arm.items():
        if not curve["steps"]:
            continue
        for key in (k for k in curve if k != "steps"):
            start, end = np.asarray(curve[key][0]), np.asarray(curve[key][-1])
            probe_stats[f"{arm}/{key}"] = {"step0": mean_std(start), "final": mean_std(end),
                                          "lift": mean_std(end - start) if start.shape == end.shape else
                                          (float("nan"), float("nan"), 0)}
    plain_curve = probes_by_arm.get("plain", {})
    probe_ablations = {}
    for arm in arms[1:]:
        curve = probes_by_arm.get(arm, {})
        if curve.get("steps") and plain_curve.get("steps"):
            for key in (k for k in curve if k != "steps"):
                final, plain_final = np.asarray(curve[key][-1]), np.asarray(plain_curve[key][-1])
                probe_ablations[f"{arm}/{key}"] = mean_std(final - plain_final)
    low = min(budgets)
    plain_ft = lifts.get(f"plain/full/{low}", (float("nan"), 0.0, 0))
    plain_probe = probe_stats.get("plain/ridge_f1_macro", {}).get("lift", (float("nan"), 0.0, 0))
    targets = {"finetune_lift_low_budget": {"value": plain_ft[0], "target": FINETUNE_LIFT_TARGET,
                                            "met": bool(plain_ft[0] >= FINETUNE_LIFT_TARGET)},
               "ridge_probe_lift": {"value": plain_probe[0], "target": PROBE_LIFT_TARGET,
                                    "met": bool(plain_probe[0] >= PROBE_LIFT_TARGET)}}
    return {"cells": cells, "lifts": lifts, "ablations": ablations, "probes": probe_stats,
            "probe_ablations": probe_ablations, "targets": targets}


def data_lines(settings: dict) -> list[str]:
    """What the study ran on: the synthetic sets with their sizes, or the real folders by name."""
    data = settings.get("data", {})
    if settings.get("synthetic_labelled", True):
        labelled = (f"Labelled set: synthetic BUS-BRA layout, {settings['patients']} patients, cues "
                    f"`{settings['cues'] or 'default'}`")
    else:
        labelled = (f"Labelled set: `{data['benchmark']}` at `{data['labelled']}` (classes "
                    f"{', '.join(data['class_names'])}; folds {', '.join(map(str, data['folds']))})")
    if settings.get("synthetic_pool", True):
        pool = f"pool: {settings['pool_count']} synthetic unlabelled images"
    else:
        pool = (f"pool: {data['pool_records']:,} real unlabelled frames from "
                + ", ".join(f"`{p['dataset']}` ({p['records']:,})" for p in data["pool"]))
    return [f"{labelled}; {settings['img_size']} px.", "",
            f"{pool[0].upper()}{pool[1:]}; pretraining {settings['pretrain_steps']:,} steps x "
            f"{settings['pretrain_batch']}; fine-tuning {settings['finetune_epochs']['full']:g} epochs at 100% labels, "
            f"{settings['finetune_epochs']['low']:g} below."]


def markdown(settings: dict, timing: dict, summary: dict) -> str:
    arms, budgets = settings["arms"], settings["budgets"]
    n = len(settings["folds"]) * len(settings["seeds"])
    lines = [f"# Lift study ({settings['scale']}): {len(settings['folds'])} folds x {len(settings['seeds'])} seeds",
             "", *data_lines(settings), "",
             f"## Downstream macro-F1 (mean ± std over {n} runs; lift = paired difference with scratch)", "",
             "| mode | labels | scratch | " + " | ".join(f"{a}" for a in arms) + " | " +
             " | ".join(f"lift {a}" for a in arms) + " |",
             "|---" * (3 + 2 * len(arms)) + "|"]
    for mode, title in (("full", "fine-tune"), ("linear", "linear probe")):
        for budget in budgets:
            row = [title, f"{budget:.0%}", fmt(summary["cells"][f"scratch/{mode}/{budget}"])]
            row += [fmt(summary["cells"][f"{a}/{mode}/{budget}"]) for a in arms]
            row += [fmt(summary["lifts"][f"{a}/{mode}/{budget}"], signed=True) for a in arms]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Probes of the pretraining encoder (mean ± std over folds; step 0 = random init)", "",
              "| arm | probe | step 0 | final | lift |", "|---|---|---|---|---|"]
    for arm in arms:
        for probe in PROBES:
            for metric, name in (("f1_macro", "macro-F1"), ("accuracy", "accuracy")):
                stats = summary["probes"].get(f"{arm}/{probe}_{metric}")
                if stats:
                    lines.append(f"| {arm} | {probe} {name} | {fmt(stats['step0'])} | {fmt(stats['final'])} | "
                                 f"{fmt(stats['lift'], signed=True)} |")
    if len(arms) > 1:
        lines += ["", "## Ablations: each option against the plain recipe (paired differences)", "",
                  "| arm | labels | fine-tune Δ macro-F1 | linear probe Δ macro-F1 | ridge probe Δ F1 (final) | "
                  "k-NN probe Δ F1 (final) |", "|---|---|---|---|---|---|"]
        for arm in arms[1:]:
            for budget in settings.get("ablation_budgets") or budgets:
                effect = summary["ablations"]
                lines.append(f"| {arm} | {budget:.0%} | {fmt(effect[f'{arm}/full/{budget}'], signed=True)} | "
                             f"{fmt(effect[f'{arm}/linear/{budget}'], signed=True)} | "
                             f"{fmt(summary['probe_ablations'].get(f'{arm}/ridge_f1_macro', ()), signed=True)} | "
                             f"{fmt(summary['probe_ablations'].get(f'{arm}/knn_f1_macro', ()), signed=True)} |")
    lines += ["", "## Targets", ""]
    for name, target in summary["targets"].items():
        lines.append(f"- {name}: {target['value']:+.3f} (target {target['target']:+.2f}): "
                     f"{'met' if target['met'] else 'NOT met'}")
    lines += ["", "## Time and machine", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {v:,.0f} |" for k, v in timing.items()]
    lines += ["", f"{settings['cpu_count']} CPUs; 1-minute load average {settings['load_average_start']} at the "
              f"start, {settings['load_average_end']} at the end. A stage already finished by an earlier "
              "invocation counts 0 s here.", ""]
    return "\n".join(lines)


def plot(path: str, settings: dict, runs: list[dict], probes_by_arm: dict[str, dict]) -> None:
    """Left: ridge (solid) and k-NN (dashed) probe accuracy, mean ± std over folds, against the pretraining
    step, per arm. Right:
    fine-tune (solid) and linear-probe (dashed) macro-F1 against the label budget, scratch and every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, arm in enumerate(settings["arms"]):
        curve = probes_by_arm.get(arm, {"steps": []})
        for probe, style in (("ridge", "-"), ("knn", "--")):
            if curve["steps"]:
                values = np.asarray(curve[f"{probe}_accuracy"], np.float64)
                mean, std = values.mean(axis=1), values.std(axis=1)
                left.plot(curve["steps"], mean, linestyle=style, marker="o", color=f"C{index}", label=f"{arm} {probe}")
                if probe == "ridge":
                    left.fill_between(curve["steps"], mean - std, mean + std, color=f"C{index}", alpha=0.12)
    left.set(xlabel="pretraining step", ylabel="probe accuracy (test split)", title="probes during pretraining")
    left.legend(fontsize=7)
    budgets = sorted(settings["budgets"])
    for index, init in enumerate(["scratch", *settings["arms"]]):
        colour = "k" if init == "scratch" else f"C{index - 1}"  # each arm in its colour of the left panel
        for mode, style in (("full", "-"), ("linear", "--")):
            stats = [mean_std(_values(runs, init, mode, b).values()) for b in budgets]
            right.errorbar([b * 100 for b in budgets], [s[0] for s in stats], yerr=[s[1] for s in stats],
                           linestyle=style, marker="o", capsize=3, color=colour,
                           label=f"{init} {'fine-tune' if mode == 'full' else 'linear probe'}")
    right.set_xscale("log")
    right.set(xlabel="labels used (% of the training split)", ylabel="test macro-F1", title="pretrained vs scratch")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out: str, settings: dict, timing: dict, runs: list[dict], probes_by_arm: dict[str, dict]) -> dict:
    """Writes lift.json, lift.md and lift.png into `out`; returns the payload (with the markdown)."""
    summary = summarize(settings, runs, probes_by_arm)
    text = markdown(settings, timing, summary)
    payload = {"settings": settings, "timing": timing, "summary": summary, "probes": probes_by_arm, "runs": runs}
    files.write_json(os.path.join(out, "lift.json"), payload)
    files.write_text(os.path.join(out, "lift.md"), text)
    plot(os.path.join(out, "lift.png"), settings, runs, probes_by_arm)
    return {**payload, "markdown": text}
