"""The VTAB-1K sweep: one training run per task, then the per-task table with the mean of the tasks
and the mean of the three group means (METHODS §5; the two differ by a few points). With a list of PEFT
kinds (`--peft adapter,vpt,lora`), one run per (kind, task) in <output>/<kind>/<task>/ and one table of kinds
x tasks with both means and each kind's trainable parameters.

A sweep is resumable: run the same command again and each run folder is taken as it is left — a run
finished with the same configuration is read back, one interrupted with it continues from its last.pt,
and a folder holding a run with other settings stops the sweep before anything trains (--overwrite retrains
those, and only those)."""
import csv
import json
import os
from dataclasses import asdict, replace
from statistics import mean
from typing import Dict, List, Optional, Sequence, Tuple

from gist_fast.training import checkpoint, distributed
from gist_fast.training.data import VTAB_TEST, VTAB_TRAIN, DataError
from gist_fast.training.loop import Stopped, train
from gist_fast.training.recipe import (
    FRAMEWORKS,
    KIND_OPTIONS,
    RUNTIME_OPTIONS,
    VTAB_GROUPS,
    VTAB_TASKS,
    TrainConfig,
    option,
    resolve,
    with_defaults,
)

METRICS = ("last_acc", "best_acc")
MEANS = (("mean_of_tasks", "mean of tasks"), ("mean_of_group_means", "mean of group means"))


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
    for key, name in MEANS:
        lines.append(f"| | **{name}** | **{summary['last_acc'][key]:.2f}** | **{summary['best_acc'][key]:.2f}** | | |")
    if summary["missing_groups"]:
        lines.append(f"\nGroups with no task run (left out of the group mean): {', '.join(summary['missing_groups'])}.")
    return "\n".join(lines) + "\n"


def kinds_table(kinds: Dict[str, dict], framework: str) -> Tuple[str, List[list]]:
    """The sweep over PEFT kinds as (markdown, CSV rows). kinds: kind -> {"tasks": its results, **summarize(them),
    "trainable": their mean}. A row per kind (the CSV: per kind and metric), a column per task in VTAB order,
    then the two means."""
    tasks = [t for t in VTAB_TASKS if any(t in k["tasks"] for k in kinds.values())]
    lines = ["| kind | trainable | " + " | ".join(tasks + [name for _, name in MEANS]) + " |",
             "|---|" + "---:|" * (1 + len(tasks) + len(MEANS))]
    rows = [["kind", "metric", "trainable", *tasks, *(key for key, _ in MEANS)]]
    for kind, k in kinds.items():
        runs = k["tasks"]
        accs = [f"{runs[t]['last_acc']:.2f} ({runs[t]['best_acc']:.2f})" if t in runs else "" for t in tasks]
        means = [f"**{k['last_acc'][key]:.2f}** ({k['best_acc'][key]:.2f})" for key, _ in MEANS]
        lines.append(f"| {kind} | {k['trainable']:,.0f} | " + " | ".join(accs + means) + " |")
        for metric in METRICS:
            rows.append([kind, metric, round(k["trainable"]),
                         *(f"{runs[t][metric]:.2f}" if t in runs else "" for t in tasks),
                         *(f"{k[metric][key]:.2f}" for key, _ in MEANS)])
    gist = FRAMEWORKS[framework][1]
    lines += ["", f"Test accuracy (%) after the last epoch (the best epoch's in parentheses); --framework {framework}: "
              f"every kind {'with' if gist else 'without'} the Gist token. Trainable: the parameters that train (the "
              f"PEFT tensors, {'the Gist token, ' if gist else ''}the head), their mean over the tasks (the head "
              "follows each task's classes)."]
    missing = [g for g in VTAB_GROUPS if any(g in k["missing_groups"] for k in kinds.values())]
    if missing:
        lines.append(f"Groups with no task run (left out of the mean of group means): {', '.join(missing)}.")
    return "\n".join(lines) + "\n", rows


def _settings(config: dict) -> dict:
    """What a run computes (runtime options dropped), JSON-normalised (a tuple read back is a list)."""
    return json.loads(json.dumps({k: v for k, v in with_defaults(config).items() if k not in RUNTIME_OPTIONS}))


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


def for_kind(base: TrainConfig, kind: str) -> TrainConfig:
    """base with PEFT kind `kind`: the options of KIND_OPTIONS only where the kind uses them (a kind's
    run does not record, nor is it told apart by, another kind's --prompts or --alpha)."""
    uses = {name: kind in kinds for name, kinds in KIND_OPTIONS.items()}
    return replace(base, peft=kind, rank=base.rank if uses["rank"] else TrainConfig.rank,
                   prompts=base.prompts if uses["prompts"] else None, alpha=base.alpha if uses["alpha"] else None)


def run(base: TrainConfig, tasks: Optional[Sequence[str]] = None, overwrite: bool = False,
        kinds: Optional[Sequence[str]] = None) -> dict:
    """Train base on every task (or the given ones) into base.output/<task>/, then write base.output/vtab.md
    and vtab.json; with kinds (PEFT kinds), every (kind, task) into base.output/<kind>/<task>/, then one
    table of kinds x tasks (vtab.md, vtab.csv, vtab.json). Every run folder is checked before the first trains."""
    if tasks is not None and not tasks:
        raise ValueError("--tasks: the list is empty; name tasks separated by commas, or leave --tasks out for all 19")
    tasks: List[str] = list(tasks or VTAB_TASKS)
    unknown = [t for t in tasks if t not in VTAB_TASKS]
    if unknown:
        raise ValueError(f"--tasks {','.join(unknown)}: not VTAB-1K tasks; choose from {', '.join(VTAB_TASKS)}")
    if kinds is not None and not kinds:
        raise ValueError("--peft: the list is empty; name PEFT kinds separated by commas")
    # each run in its own folder, with its task's own lr / weight decay / drop-path
    configs = {(kind, t): resolve(replace(base if kind is None else for_kind(base, kind), task=t,
                                          output=os.path.join(base.output, *([kind] if kind else []), t)))
               for kind in (kinds or [None]) for t in tasks}
    plans = {key: _plan(cfg, overwrite) for key, cfg in configs.items()}
    results: Dict[Tuple[Optional[str], str], dict] = {}
    for (kind, task), cfg in configs.items():
        name = f"{kind}/{task}" if kind else task
        plan, done = plans[kind, task]
        if plan == "done":
            results[kind, task] = done
            continue
        print(f"== {name} ({'continued from last.pt' if plan == 'resume' else 'trained'}) ==", flush=True)
        resume = os.path.join(cfg.output, "last.pt") if plan == "resume" else None
        try:
            results[kind, task] = train(cfg, resume, overwrite=plan == "overwrite")
        except Stopped as stop:
            raise Stopped(f"{name}: {stop.reason}; run the same gist-fast vtab command again to continue the sweep",
                          stop.exit_code) from None
    config = {k: v for k, v in vars(base).items() if k != "task"}
    if kinds is None:
        by_task = {t: results[None, t] for t in tasks}
        summary = summarize(by_task)
        out = {"results": by_task, "summary": summary, "table": markdown(by_task, summary)}
        record = {"config": config, "tasks": by_task, **summary}
    else:
        by_kind = {}
        for kind in kinds:
            by_task = {t: results[kind, t] for t in tasks}
            by_kind[kind] = {"tasks": by_task, **summarize(by_task),
                             "trainable": mean(r["trainable"] for r in by_task.values())}
        table, rows = kinds_table(by_kind, base.framework)
        out = {"results": by_kind, "table": table}
        record = {"config": {k: v for k, v in config.items() if k != "peft"}, "kinds": by_kind}
    if not distributed.is_main_process():
        return out
    with open(os.path.join(base.output, "vtab.md"), "w") as f:
        f.write(out["table"])
    if kinds is not None:
        with open(os.path.join(base.output, "vtab.csv"), "w", newline="") as f:
            csv.writer(f).writerows(rows)
    with open(os.path.join(base.output, "vtab.json"), "w") as f:
        json.dump(record, f, indent=1)
    return out
