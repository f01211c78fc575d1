"""The CPU demo's effect over several seeds: base vs ThinkSafe vs ThinkSafe+KL (issue: demo shows the effect).

For each seed, in its own output directory, runs exactly what a user runs —
`./scripts/train_and_eval.sh cpu demo` and then the same with use_kl=true (reusing the synthesized
data) — with the demo recipe's seeds set to that seed (synthesis sampling, training, evaluation
sampling). Then prints per-seed numbers and mean ± spread (min..max) of: refusal on held-out
harmful prompts (AdvBench, the source of the demo's training prompts), refusal on the HarmBench and
StrongREJECT subsets (other sources; the refusal-phrase judge, as on the held-out prompts), and
over-refusal on XSTest safe prompts.

    python bench/demo_effect.py --seeds 1 2 3 --out bench/results/demo_effect   (~19 min per seed here)

`--cached-kl K` synthesizes with the base model's top-K stored (the samples are the same: storing
only reads the logits) and adds a third command per seed, ThinkSafe+KL with `kl_reference: cached`,
to set beside the exact KL run on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from thinksafe.plan import resolve_plan  # noqa: E402

# (task, metric in its metrics.json: the primary one or a secondary) -> column
METRICS = {("heldout_harmful", "refusal_rate"): "refusal on held-out harmful (AdvBench) ↑",
           ("harmbench", "refusal_rate_phrase"): "refusal on HarmBench ↑",
           ("strongreject", "refusal_rate_phrase"): "refusal on StrongREJECT ↑",
           ("xstest", "over_refusal_rate"): "XSTest safe over-refusal ↓"}


def read_metric(metrics: dict, metric: str) -> dict:
    found = metrics if metrics["metric"] == metric else metrics["secondary"][metric]
    return {"value": found["value"], "n": found["n"], "ci95": found.get("ci95")}


def seeded_recipe(seed: int, cached_kl: int = 0, kl_reference: str = "forward") -> dict:
    """Every seed of the demo run set (THINKSAFE_RECIPE is laid over the demo's own recipe)."""
    return {
        "synthesize": {"seed": seed, **({"store_reference_topk": cached_kl} if cached_kl else {})},
        "sft": {"seed": seed, "report_to": "none", "kl_reference": kl_reference},
        "evaluate": {"seed": seed, "report_to": "none"},
    }


def commands(cached_kl: int) -> list[tuple[str, str, str]]:
    """(label, use_kl, kl_reference) per command, in the order they run (the first synthesizes)."""
    return [("thinksafe", "false", "forward"), ("thinksafe+kl", "true", "forward"),
            *([("thinksafe+kl cached", "true", "cached")] if cached_kl else [])]


def run_seed(seed: int, out: Path, cached_kl: int = 0) -> dict:
    timings, runs = {}, {}
    out.mkdir(parents=True, exist_ok=True)
    for label, use_kl, kl_reference in commands(cached_kl):
        recipe = Path(tempfile.mkdtemp()) / f"demo_seed{seed}.yaml"
        recipe.write_text(yaml.safe_dump(seeded_recipe(seed, cached_kl, kl_reference)))
        env = {**os.environ, "THINKSAFE_OUTPUT_DIR": str(out), "THINKSAFE_RECIPE": str(recipe), "WANDB_MODE": "disabled"}
        start = time.time()
        log = out / f"{label.replace(' ', '_')}.log"
        with log.open("w") as handle:
            code = subprocess.run(["bash", str(ROOT / "scripts/train_and_eval.sh"), "cpu", "demo", "", "", use_kl],
                                  stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        timings[label] = round(time.time() - start)
        if code != 0:
            raise SystemExit(f"seed {seed} {label}: exit {code}, log {log}")
        os.environ.update(THINKSAFE_OUTPUT_DIR=str(out), THINKSAFE_RECIPE=str(recipe))  # name the run as it ran
        plan = resolve_plan({"devices": "cpu", "model_type": "demo", "use_kl": use_kl}, check_devices=False)
        runs.setdefault("base", plan["base_results"])
        runs[label] = plan["path_results"]
    result = {"seed": seed, "wall_s": timings}
    for run, results in runs.items():
        for task, metric in METRICS:
            metrics = json.loads((Path(results) / task / "metrics.json").read_text())
            result[f"{run}/{task}/{metric}"] = read_metric(metrics, metric)
    return result


def summarize(results: list[dict]) -> str:
    lines = ["| run | " + " | ".join(METRICS.values()) + " |", "| --- " * (len(METRICS) + 1) + "|"]
    runs = ["base", *results[0]["wall_s"]]
    for run in runs:
        cells = []
        for task, metric in METRICS:
            values = [100 * r[f"{run}/{task}/{metric}"]["value"] for r in results]
            spread = f"{min(values):.0f}..{max(values):.0f}"
            cells.append(f"{statistics.mean(values):.1f} ({spread}; " + ", ".join(f"{v:.0f}" for v in values) + ")")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    n = " / ".join(f"{results[0][f'base/{task}/{metric}']['n']} {task}" for task, metric in METRICS)
    lines.append(f"\nmean over seeds {[r['seed'] for r in results]} (min..max; per seed), "
                 f"n = {n} samples per run and seed; wall s per seed: "
                 + ", ".join(str(r["wall_s"]) for r in results))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_demo_effect"))
    parser.add_argument("--cached-kl", type=int, default=0, metavar="K",
                        help="also train ThinkSafe+KL from the base model's top-K stored at synthesis")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, (args.out / f"seed{seed}").resolve(), args.cached_kl))
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results[-1]), flush=True)
    table = summarize(results)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
