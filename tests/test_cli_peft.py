"""`gist-fast train --peft vpt|lora|qkv-lora|ssf` with --prompts / --alpha, GistLoss's --gist-temperature and
--gist-weight, and `gist-fast vtab --peft KIND,KIND`: parsing, one-line mistakes, the flow into patch() and
GistLoss, resume / eval rebuilding the same model, and the kinds x tasks sweep (issue 12, item 6)."""
import csv
import inspect
import json
import os
import re
import shlex

import pytest
import torch

import gist_fast
from gist_fast import cli
from gist_fast.peft import KINDS, TUNABLE
from gist_fast.training import models, vtab
from gist_fast.training.recipe import KIND_OPTIONS, TrainConfig, resolve
from train_helpers import TINY, make_task, one_line_error, train

SHORT = ["--epochs", "1", "--warmup-epochs", "0", "--cooldown-epochs", "0", "--batch-size", "8"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    make_task(root)
    make_task(root, "patch_camelyon", classes=2)
    return root


def _config(*argv):
    """The TrainConfig `gist-fast train argv` would run, resolved (no training)."""
    args = vars(cli.parser().parse_args(["train", *argv]))
    args.pop("command")
    return resolve(cli._train_config(args))


def test_kind_options_follow_the_registry():
    assert TUNABLE == ("adapter", "seq-adapter", "adaptformer", "vpt", "lora", "qkv-lora", "ssf")
    assert KIND_OPTIONS["prompts"] == ("vpt",) and KIND_OPTIONS["alpha"] == ("lora", "qkv-lora")
    assert KIND_OPTIONS["rank"] == ("adapter", "seq-adapter", "adaptformer", "lora", "qkv-lora")
    loss = inspect.signature(gist_fast.GistLoss).parameters  # --gist-weight is GistLoss's kl_weight (lambda)
    assert (TrainConfig.gist_temperature, TrainConfig.gist_weight) == (loss["temperature"].default,
                                                                      loss["kl_weight"].default) == (3.0, 0.75)


@pytest.mark.parametrize("argv, expected", [
    (["--peft", "vpt", "--alpha", "2"], ["--peft vpt does not use --alpha", "--alpha: --peft lora/qkv-lora"]),
    (["--peft", "lora", "--prompts", "10"], ["--peft lora does not use --prompts", "--prompts: --peft vpt"]),
    (["--prompts", "10"], ["--framework gist (--peft adapter) does not use --prompts"]),
    (["--peft", "ssf", "--rank", "8"], ["--peft ssf does not use --rank"]),
    (["--peft", "vpt", "--rank", "8", "--alpha", "1"], ["does not use --rank, --alpha"]),
    (["--framework", "adapter", "--gist-weight", "1"], ["--framework adapter does not use --gist-weight",
                                                        "--gist-weight: gist"]),
    (["--framework", "idat", "--gist-temperature", "10"], ["--framework idat does not use --gist-temperature"]),
    (["--framework", "linear", "--prompts", "5"], ["--framework linear does not use --prompts"]),
    (["--framework", "two-stage", "--peft", "lora"], ["--framework two-stage does not use --peft"]),
    (["--peft", "vpt", "--prompts", "0"], ["--prompts 0: must be >= 1"]),
    (["--peft", "qkv-lora", "--alpha", "-1"], ["--alpha -1.0: must be > 0"]),
    (["--peft", "lora", "--alpha", "nan"], ["--alpha nan"]),
    (["--gist-temperature", "0"], ["--gist-temperature 0.0: must be > 0"]),
    (["--gist-weight", "-0.5"], ["--gist-weight -0.5: must be >= 0"]),
    (["--gist-weight", "inf"], ["--gist-weight inf"]),
    (["--peft", "prompt"], ["--peft", "invalid choice: 'prompt'"]),
    (["--peft", "ln"], ["--peft", "invalid choice: 'ln'"]),
])
def test_each_mistake_is_one_line_and_writes_nothing(root, tmp_path, capsys, argv, expected):
    code = cli.main(["train", "--data", str(root), "--task", "kitti", "--output", str(tmp_path / "out"), *SHORT,
                     *TINY, *argv])
    one_line_error(capsys, code, *expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--peft", "adapter,banana"], ["argument --peft", "banana", "vpt"]),
    (["--peft", "lora,vpt,lora"], ["argument --peft", "lora named twice"]),
    (["--peft", ","], ["argument --peft"]),
    (["--peft", "adapter,ssf", "--prompts", "10"], ["--peft adapter,ssf does not use --prompts"]),
    (["--peft", "vpt,ssf", "--alpha", "2"], ["--peft vpt,ssf does not use --alpha"]),
    (["--framework", "linear", "--peft", "vpt,lora"], ["--framework linear does not use --peft"]),
    (["--framework", "adapter", "--peft", "vpt", "--gist-weight", "0.5"], ["does not use --gist-weight"]),
])
def test_sweep_mistakes_are_one_line(root, tmp_path, capsys, argv, expected):
    code = cli.main(["vtab", "--data", str(root), "--tasks", "kitti", "--output", str(tmp_path / "v"), *SHORT, *TINY,
                     *argv])
    one_line_error(capsys, code, *expected)
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("argv, peft, gist, extra", [
    (["--peft", "vpt", "--prompts", "3"], "vpt", True, dict(prompts=3, alpha=None)),
    (["--peft", "vpt"], "vpt", True, dict(prompts=KINDS["vpt"].prompts)),  # patch()'s default, recorded there
    (["--framework", "adapter", "--peft", "lora", "--rank", "2", "--alpha", "2.5"], "lora", False,
     dict(rank=2, alpha=2.5, prompts=None)),
    (["--peft", "lora"], "lora", True, dict(alpha=KINDS["lora"].alpha)),
    (["--peft", "qkv-lora", "--rank", "3", "--alpha", "16"], "qkv-lora", True, dict(rank=3, alpha=16.0)),
    (["--peft", "qkv-lora"], "qkv-lora", True, dict(alpha=KINDS["qkv-lora"].alpha)),
    (["--framework", "adapter", "--peft", "ssf"], "ssf", False, dict(prompts=None, alpha=None)),
    (["--peft", "adaptformer", "--rank", "2"], "adaptformer", True, dict(rank=2)),
])
def test_options_flow_into_patch(argv, peft, gist, extra):
    cfg = _config(*TINY, *argv)
    model = models.student(cfg, 4, verbose=False)
    got = gist_fast.patch_config(model)
    assert (got["peft"], got["gist"]) == (peft, gist)
    assert {k: got[k] for k in extra} == extra
    assert hasattr(model, "gist_token") == gist


def test_gist_loss_options_reach_the_loss(root, tmp_path, monkeypatch):
    made = []

    class Spy(gist_fast.GistLoss):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(gist_fast, "GistLoss", Spy)
    assert train(root, tmp_path / "a", "--stop-after-steps", "1") == 0
    assert (made[-1].temperature, made[-1].kl_weight, made[-1].gist_weight) == (3.0, 0.75, 0.5)  # GIST's own
    assert train(root, tmp_path / "b", "--gist-temperature", "10", "--gist-weight", "0.25", "--stop-after-steps",
                 "1") == 0
    assert (made[-1].temperature, made[-1].kl_weight, made[-1].gist_weight) == (10.0, 0.25, 0.5)
    saved = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["config"]
    assert (saved["gist_temperature"], saved["gist_weight"]) == (10.0, 0.25)
    assert cli.main(["train", "--resume", str(tmp_path / "b" / "last.pt"), "--no-progress"]) == 0  # kept on resume
    assert (made[-1].temperature, made[-1].kl_weight) == (10.0, 0.25)


@pytest.mark.parametrize("argv", [["--peft", "vpt", "--prompts", "3"],
                                  ["--framework", "adapter", "--peft", "lora", "--alpha", "2"]])
def test_resume_and_eval_rebuild_the_same_model(root, tmp_path, capsys, argv):
    """A run stopped mid-epoch and resumed ends where the uninterrupted one does (prompt dropout and
    drop-path on); eval rebuilds the model from best.pt; the resumed run refuses another --prompts / --alpha."""
    common = [*argv, "--drop-path", "0.1", "--epochs", "2"]
    assert train(root, tmp_path / "full", *common) == 0
    assert train(root, tmp_path / "cut", *common, "--stop-after-steps", "3") == 0
    cut = str(tmp_path / "cut" / "last.pt")
    option, value = argv[-2:]
    capsys.readouterr()
    one_line_error(capsys, cli.main(["train", "--resume", cut, option, value + "1"]), f"differ from it: {option}")
    assert cli.main(["train", "--resume", cut, option, value, "--no-progress"]) == 0  # the same value is no change
    full, resumed = (torch.load(tmp_path / d / "last.pt", weights_only=False) for d in ("full", "cut"))
    assert full["student"]["gist_fast_config"] == resumed["student"]["gist_fast_config"]
    key = option.lstrip("-")
    assert resumed["config"][key] == resumed["student"]["gist_fast_config"][key] == type(resumed["config"][key])(value)
    for name, t in full["student"]["state_dict"].items():
        assert torch.equal(t, resumed["student"]["state_dict"][name]), name
    best = json.loads((tmp_path / "cut" / "result.json").read_text())["best_acc"]
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "cut" / "best.pt"), "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] == pytest.approx(best)


def test_for_kind_keeps_only_the_options_a_kind_uses():
    base = TrainConfig(prompts=7, alpha=2.0, rank=8)
    assert (vtab.for_kind(base, "vpt").prompts, vtab.for_kind(base, "vpt").alpha, vtab.for_kind(base, "vpt").rank) \
        == (7, None, TrainConfig.rank)
    assert (vtab.for_kind(base, "lora").prompts, vtab.for_kind(base, "lora").alpha) == (None, 2.0)
    assert vtab.for_kind(base, "adapter").rank == 8 and vtab.for_kind(base, "ssf").peft == "ssf"


def test_sweep_over_kinds_writes_one_table_and_resumes(root, tmp_path, capsys):
    out = tmp_path / "kinds"
    sweep = ["vtab", "--data", str(root), "--tasks", "patch_camelyon,kitti", "--output", str(out), *SHORT, *TINY,
             "--prompts", "2", "--alpha", "2"]
    assert cli.main([*sweep, "--peft", "vpt,lora", "--stop-after-steps", "1"]) == 0  # stops in vpt/kitti
    assert "run the same gist-fast vtab command again" in capsys.readouterr().err
    assert not (out / "vtab.md").exists()
    assert cli.main([*sweep, "--peft", "vpt,lora"]) == 0
    printed = capsys.readouterr().out
    assert "== vpt/patch_camelyon" not in printed  # finished in its one step
    assert "== vpt/kitti (continued from last.pt)" in printed and "== lora/patch_camelyon (trained)" in printed
    for kind in ("vpt", "lora"):
        for task in ("kitti", "patch_camelyon"):
            result = json.loads((out / kind / task / "result.json").read_text())
            assert result["config"]["peft"] == kind and result["config"]["task"] == task
    vpt, lora = (json.loads((out / k / "kitti" / "result.json").read_text())["config"] for k in ("vpt", "lora"))
    assert (vpt["prompts"], vpt["alpha"], lora["prompts"], lora["alpha"]) == (2, None, None, 2.0)

    record = json.loads((out / "vtab.json").read_text())
    assert list(record["kinds"]) == ["vpt", "lora"] and "peft" not in record["config"]
    for kind, k in record["kinds"].items():
        accs = {t: r["last_acc"] for t, r in k["tasks"].items()}
        assert k["last_acc"]["mean_of_tasks"] == pytest.approx(sum(accs.values()) / 2)
        assert k["last_acc"]["mean_of_group_means"] == pytest.approx((accs["kitti"] + accs["patch_camelyon"]) / 2)
        assert k["missing_groups"] == ["natural"]
        assert k["trainable"] == pytest.approx(sum(r["trainable"] for r in k["tasks"].values()) / 2)
    # ViT (embed 48, depth 2, 3 heads: d_h 16) with the gist token: 2 prompts, or LoRA r 4 on q and v
    heads = 49 * 4 + 49 * 2  # kitti 4 classes, patch_camelyon 2
    assert record["kinds"]["vpt"]["trainable"] == (2 * 48 + 48) + heads / 2
    assert record["kinds"]["lora"]["trainable"] == (2 * 2 * 2 * 16 * 4 + 48) + heads / 2  # 707

    md = (out / "vtab.md").read_text().splitlines()
    assert md[0] == "| kind | trainable | patch_camelyon | kitti | mean of tasks | mean of group means |"
    assert md[2].startswith("| vpt | 291 | ") and md[3].startswith("| lora | 707 | ")
    assert "--framework gist: every kind with the Gist token" in md[-2]
    assert md[-1] == "Groups with no task run (left out of the mean of group means): natural."
    rows = list(csv.reader(open(out / "vtab.csv")))
    assert rows[0] == ["kind", "metric", "trainable", "patch_camelyon", "kitti", "mean_of_tasks",
                       "mean_of_group_means"]
    assert [r[:3] for r in rows[1:]] == [["vpt", "last_acc", "291"], ["vpt", "best_acc", "291"],
                                         ["lora", "last_acc", "707"], ["lora", "best_acc", "707"]]
    assert float(rows[1][3]) == pytest.approx(record["kinds"]["vpt"]["tasks"]["patch_camelyon"]["last_acc"], abs=5e-3)

    capsys.readouterr()  # the same sweep with one more kind: only the new kind's runs train
    assert cli.main([*sweep, "--peft", "vpt,lora,ssf"]) == 0
    trained = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert trained == ["== ssf/patch_camelyon (trained) ==", "== ssf/kitti (trained) =="]
    assert list(json.loads((out / "vtab.json").read_text())["kinds"]) == ["vpt", "lora", "ssf"]
    # another --prompts changes vpt's runs only: refused before anything trains, naming the folder and the option
    one_line_error(capsys, cli.main([*sweep[:-4], "--prompts", "3", "--alpha", "2", "--peft", "lora,vpt"]),
                    "vpt/patch_camelyon", "--prompts differ", "--overwrite")


NEW_OPTIONS = ("prompts", "alpha", "gist_temperature", "gist_weight")


def test_a_sweep_or_checkpoint_recorded_before_these_options(root, tmp_path, capsys):
    """A configuration recorded before --prompts / --alpha / --gist-* existed ran with their defaults: the same
    sweep reads its finished task back instead of refusing the folder, and its last.pt resumes with them named."""
    sweep = ["vtab", "--data", str(root), "--tasks", "kitti", "--output", str(tmp_path), *SHORT, *TINY]
    assert cli.main(sweep) == 0
    path = tmp_path / "kitti" / "result.json"
    result = json.loads(path.read_text())
    for key in NEW_OPTIONS:
        del result["config"][key]
    path.write_text(json.dumps(result))
    capsys.readouterr()
    assert cli.main(sweep) == 0
    assert "== kitti" not in capsys.readouterr().out

    assert train(root, tmp_path / "old", "--stop-after-steps", "1") == 0
    last = tmp_path / "old" / "last.pt"
    state = torch.load(last, weights_only=False)
    for key in NEW_OPTIONS:
        del state["config"][key]
    torch.save(state, last)
    assert cli.main(["train", "--resume", str(last), "--gist-weight", "0.75", "--no-progress"]) == 0


def test_help_says_what_each_option_is(capsys):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "GistLoss temperature T" in text and "the weight of each of the two KL terms" in text
    assert "vpt (VPT-shallow prompts)" in text and "qkv-lora (Hu et al.'s LoRA" in text
    assert f"prompt tokens ({KINDS['vpt'].prompts}," in text


def test_readme_command_lines_parse():
    """Every `gist-fast train|vtab|eval` line of the README's CLI block parses, and names only options its
    framework and PEFT kinds use."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = re.search(r"## Training from the command line.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("gist-fast ")]
    assert any("--peft adapter,vpt" in line for line in lines) and any("--gist-weight" in line for line in lines)
    for line in lines:
        argv = shlex.split(line)[1:]
        args = vars(cli.parser().parse_args(argv))
        command = args.pop("command")
        if command in ("train", "vtab"):
            for name in ("resume", "tasks", "overwrite"):
                args.pop(name, None)
            kinds = args.pop("peft", None) if command == "vtab" else None
            cli._train_config(args, kinds)
