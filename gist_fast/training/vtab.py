"""The VTAB-1K sweep: one training run per task, then the per-task table with the mean of the tasks
and the mean of the three group means (METHODS §5; the two differ by a few points).

A sweep is resumable: run the same command again and each task folder is taken as it is left — a task
finished with the same configuration is read back, one interrupted with it continues from its last.pt,
and a folder holding a run with other settings stops the sweep before anything trains (--overwrite retrains
those, and only those)."""
import json
import os
from dataclasses import asdict, replace
from statistics import mean
from typing import Dict, List, Optional, Sequence, Tuple

from gist_fast.training import checkpoint, distributed
from gist_fast.training.data import VTAB_TEST, VTAB_TRAIN, DataError
from gist_fast.training.loop import Stopped, train
from gist_fast.training.recipe import RUNTIME_OPTIONS, VTAB_GROUPS, VTAB_TASKS, TrainConfig, option, resolve

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
                lines.append(f"| {group} | {t} | {r['last_acc']:.2f} | {r['best_acc']:.2f} | {r['trainable']:,} "
                             f"| {r['epochs']} |")
    for group in summary["last_acc"]["groups"]:
        lines.append(f"| {group} | *group mean* | {summary['last_acc']['groups'][group]:.2f} | "
                     f"{summary['best_acc']['groups'][group]:.2f} | | |")
    for key, name in (("mean_of_tasks", "mean of tasks"), ("mean_of_group_means", "mean of group means")):
        lines.append(f"| | **{name}** | **{summary['last_acc'][key]:.2f}** | **{summary['best_acc'][key]:.2f}** | | |")
    if summary["missing_groups"]:
        lines.append(f"\nGroups with no task run (left out of the group mean): {', '.join(summary['missing_groups'])}.")
    return "\n".join(lines) + "\n"


def _settings(config: dict) -> dict:
    """What a run computes (runtime options dropped), JSON-normalised (a tuple read back is a list)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in RUNTIME_OPTIONS}))


def _recorded(folder: str) -> Tuple[Optional[dict], Optional[dict]]:
    """(result with its configuration, or None; the configuration of last.pt, or None)."""
    result = last = None
    if os.path.isfile(os.path.join(folder, "result.json")):
        with open(os.path.join(folder, "result.json")) as f:
            result = json.load(f)
    if os.path.isfile(os.path.join(folder, "last.pt")):
        last = checkpoint.load(os.path.join(folder, "last.pt"))["config"]
    return result, last


def _plan(cfg: TrainConfig, overwrite: bool) -> Tuple[str, Optional[dict]]:
    """What to do with one task folder: "done" (with its result), "resume", "train" or "overwrite"; a folder
    holding a run with other settings is refused (naming them) unless overwrite."""
    for name in (VTAB_TRAIN, VTAB_TEST):
        if not os.path.isfile(os.path.join(cfg.data, cfg.task, name)):
            raise DataError(f"{os.path.join(cfg.data, cfg.task, name)}: not found (a VTAB-1K task folder has "
                            f"{VTAB_TRAIN} and {VTAB_TEST})")
    files = checkpoint.earlier_run(cfg.output)
    if not files:
        return "train", None
    result, last = _recorded(cfg.output)
    wanted = _settings(asdict(cfg))
    if result is not None and _settings(result.get("config", {})) == wanted:
        return "done", {k: v for k, v in result.items() if k != "config"}
    if result is None and last is not None and _settings(last) == wanted:
        return "resume", None
    if overwrite:  # only what was trained with other settings
        return "overwrite", None
    recorded = (result or {}).get("config") or last
    theirs = _settings(recorded) if recorded is not None else None
    why = "not recorded" if theirs is None else ", ".join(
        sorted(option(k) for k in wanted if theirs.get(k) != wanted[k])) + " differ"
    raise ValueError(f"{cfg.output} holds a run ({', '.join(files)}) with other settings ({why}): pass --overwrite "
                     "to train it again, or choose another --output")


def run(base: TrainConfig, tasks: Optional[Sequence[str]] = None, overwrite: bool = False) -> dict:
    """Train base on every task (or the given ones) into base.output/<task>/, then write
    base.output/vtab.md and vtab.json. Every task folder is checked before the first task trains."""
    if tasks is not None and not tasks:
        raise ValueError("--tasks: the list is empty; name tasks separated by commas, or leave --tasks out for all 19")
    tasks: List[str] = list(tasks or VTAB_TASKS)
    unknown = [t for t in tasks if t not in VTAB_TASKS]
    if unknown:
        raise ValueError(f"--tasks {','.join(unknown)}: not VTAB-1K tasks; choose from {', '.join(VTAB_TASKS)}")
    configs = {t: resolve(replace(base, task=t, output=os.path.join(base.output, t))) for t in tasks}  # the
    plans = {t: _plan(cfg, overwrite) for t, cfg in configs.items()}  # task's own lr / weight decay / drop-path
    results = {}
    for task, cfg in configs.items():
        plan, done = plans[task]
        if plan == "done":
            results[task] = done
            continue
        print(f"== {task} ({'continued from last.pt' if plan == 'resume' else 'trained'}) ==", flush=True)
        resume = os.path.join(cfg.output, "last.pt") if plan == "resume" else None
        try:
            results[task] = train(cfg, resume, overwrite=plan == "overwrite")
        except Stopped as stop:
            raise Stopped(f"{task}: {stop.reason}; run the same gist-fast vtab command again to continue the sweep",
                          stop.exit_code) from None
    summary = summarize(results)
    table = markdown(results, summary)
    if not distributed.is_main_process():
        return {"results": results, "summary": summary, "table": table}
    with open(os.path.join(base.output, "vtab.md"), "w") as f:
        f.write(table)
    with open(os.path.join(base.output, "vtab.json"), "w") as f:
        config = {k: v for k, v in vars(base).items() if k != "task"}
        json.dump({"config": config, "tasks": results, **summary}, f, indent=1)
    return {"results": results, "summary": summary, "table": table}
