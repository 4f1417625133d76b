"""The VTAB-1K sweep: one training run per task, then the per-task table with the mean of the tasks
and the mean of the three group means (METHODS §5; the two differ by a few points)."""
import json
import os
from dataclasses import replace
from statistics import mean
from typing import Dict, List, Optional, Sequence

from gist_fast.training.loop import train
from gist_fast.training.recipe import VTAB_GROUPS, VTAB_TASKS, TrainConfig

METRICS = ("last_acc", "best_acc")


def summarize(results: Dict[str, dict]) -> dict:
    """Per metric: the mean over tasks and the mean of the group means (groups with no task run
    are left out, and named)."""
    summary = {}
    for metric in METRICS:
        groups = {g: mean(results[t][metric] for t in ts if t in results)
                  for g, ts in VTAB_GROUPS.items() if any(t in results for t in ts)}
        summary[metric] = {"mean_of_tasks": mean(r[metric] for r in results.values()),
                           "mean_of_group_means": mean(groups.values()), "groups": groups}
    summary["missing_groups"] = [g for g in VTAB_GROUPS if g not in summary["last_acc"]["groups"]]
    return summary


def markdown(results: Dict[str, dict], summary: dict) -> str:
    lines = ["| group | task | last acc | best acc | trainable | epochs |", "|---|---|---:|---:|---:|---:|"]
    for group, tasks in VTAB_GROUPS.items():
        for t in tasks:
            if t in results:
                r = results[t]
                lines.append(f"| {group} | {t} | {r['last_acc']:.2f} | {r['best_acc']:.2f} | {r['trainable']:,} | {r['epochs']} |")
    for group in summary["last_acc"]["groups"]:
        lines.append(f"| {group} | *group mean* | {summary['last_acc']['groups'][group]:.2f} | "
                     f"{summary['best_acc']['groups'][group]:.2f} | | |")
    for key, name in (("mean_of_tasks", "mean of tasks"), ("mean_of_group_means", "mean of group means")):
        lines.append(f"| | **{name}** | **{summary['last_acc'][key]:.2f}** | **{summary['best_acc'][key]:.2f}** | | |")
    if summary["missing_groups"]:
        lines.append(f"\nGroups with no task run (left out of the group mean): {', '.join(summary['missing_groups'])}.")
    return "\n".join(lines) + "\n"


def run(base: TrainConfig, tasks: Optional[Sequence[str]] = None) -> dict:
    """Train base on every task (or the given ones) into base.output/<task>/, then write
    base.output/vtab.md and vtab.json. A task whose result.json exists is not trained again."""
    tasks: List[str] = list(tasks or VTAB_TASKS)
    unknown = [t for t in tasks if t not in VTAB_TASKS]
    if unknown:
        raise ValueError(f"unknown VTAB-1K tasks {unknown}; choose from {', '.join(VTAB_TASKS)}")
    results = {}
    for task in tasks:
        out = os.path.join(base.output, task)
        done = os.path.join(out, "result.json")
        if os.path.isfile(done):
            with open(done) as f:
                results[task] = json.load(f)
            continue
        print(f"== {task} ==", flush=True)
        results[task] = train(replace(base, task=task, output=out))  # the task's own lr / wd / drop-path
    summary = summarize(results)
    table = markdown(results, summary)
    if int(os.environ.get("RANK", "0")):
        return {"results": results, "summary": summary, "table": table}
    with open(os.path.join(base.output, "vtab.md"), "w") as f:
        f.write(table)
    with open(os.path.join(base.output, "vtab.json"), "w") as f:
        json.dump({"config": {k: v for k, v in vars(base).items() if k != "task"}, "tasks": results, **summary}, f, indent=1)
    return {"results": results, "summary": summary, "table": table}
