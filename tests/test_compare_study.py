"""compare.py as a study on the toy world: an lr grid tuned on other targets, several seeds,
mean ± CI, paired differences, trajectories, membership inference, and the last validation
standing in for eval.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

import compare
from conftest import OFFLINE, save_split


@pytest.fixture(scope="module")
def study(toy_world, tmp_path_factory):
    """Reported split "mini" (toy targets 0-3) and tuning split "tune" (targets 4-7), each target
    paired with a row of its family; 8 held-out rows; 8 unseen rows for membership inference."""
    root = tmp_path_factory.mktemp("study")
    meta = toy_world["meta"]
    fam = np.asarray(meta["families"])
    targets = list(meta["target_ids"][:8])

    def neighbours(ts):
        return [next(i for i in np.flatnonzero(fam == fam[t]) if i not in targets) for t in ts]

    save_split(toy_world, root / "data", "mini", targets[:4], neighbours(targets[:4]))
    save_split(toy_world, root / "data", "tune", targets[4:], neighbours(targets[4:]))
    save_split(toy_world, root / "data", "overlap", targets[3:7], neighbours(targets[3:7]))
    rows = np.load(toy_world["train_file"])
    held = np.load(toy_world["heldout_ids"])
    np.save(root / "heldout.npy", rows[held[:8]])
    np.save(root / "tune_heldout.npy", rows[held[8:16]])
    np.save(root / "unseen.npy", rows[held[16:24]])
    cfg = {"common": {"max_epochs": 2, "el_when": "needed"}, "methods": {"ga": {"lr": [3e-4, 1e-4]}}}
    (root / "cfg.json").write_text(json.dumps(cfg))
    return {"root": root, "model": toy_world["model"]}


def _argv(s, out, *extra):
    r = s["root"]
    return ["--exp", "mini", "--data_dir", str(r / "data"), "--model_name", s["model"], *OFFLINE,
            "--batch_size", "4", "--eval_batch_size", "4", "--methods", "original,ga", "--config",
            str(r / "cfg.json"), "--heldout", str(r / "heldout.npy"), "--dir", str(out), *extra]


@pytest.mark.slow
def test_seeds_and_lr_grid_on_the_toy(study, tmp_path):
    out = tmp_path / "study"
    r = study["root"]
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "downstream")
    argv = _argv(study, out, "--seeds", "0,1", "--baseline", "original,ga", "--tune_exp", "tune",
                 "--tune_heldout", str(r / "tune_heldout.npy"), "--unseen", str(r / "unseen.npy"),
                 "--tasks", "copa,pile", "--task_dir", fixtures, "--task_limit", "4",
                 "--task_runs", "1", "--every_run_tasks", "pile")
    assert compare.main(argv) == 0

    # tuning: each grid lr ran on the tuning split only, scored on its own held-out rows
    tuning = json.loads((out / "tuning.json").read_text())
    grid = pd.read_csv(out / "tuning.csv")
    assert sorted(grid["lr"]) == [1e-4, 3e-4] and grid["exp"].eq("tune").all()
    chosen = tuning["chosen"]["ga"]["lr"]
    assert grid.loc[grid["chosen"], "lr"].tolist() == [chosen]
    for lr in (3e-4, 1e-4):
        cmds = [ln for ln in (out / "tuning" / "ga" / f"lr{lr:g}" / "train.out").read_text().splitlines()
                if ln.startswith("$ ")]
        assert cmds and all(" --exp tune " in c and " --exp mini " not in c for c in cmds)
        assert all(str(r / "tune_heldout.npy") in c and str(r / "heldout.npy") not in c for c in cmds)
    reached = grid[grid["reached"]]
    if len(reached):  # the choice is the lowest held-out loss at equal forgetting among them
        assert chosen == reached.sort_values("score")["lr"].iloc[0]

    # the reported runs: one per seed, at the chosen lr, on the reported split
    runs = pd.read_csv(out / "runs.csv")
    ga = runs[runs["method"] == "ga"]
    assert sorted(ga["seed"]) == [0, 1] and (ga["lr"] == chosen).all() and (ga["exp"] == "mini").all()
    assert len(runs[runs["method"] == "original"]) == 1
    for seed in (0, 1):
        run = json.loads((out / "runs" / "mini" / f"seed{seed}" / "ga" / "train" / "run.json").read_text())
        assert run["args"]["seed"] == seed and run["args"]["exp"] == "mini" and run["args"]["lr"] == chosen

    # tasks: all of --tasks on the first run, only the --every_run_tasks ones on the next
    by_seed = ga.set_index("seed")
    assert by_seed.loc[0, ["copa", "pile"]].notna().all() and by_seed.loc[0, "downstream_mean"] == by_seed.loc[0, "copa"]
    assert pd.isna(by_seed.loc[1, "copa"]) and pd.isna(by_seed.loc[1, "downstream_mean"])
    valid1 = pd.read_csv(out / "runs" / "mini" / "seed1" / "ga" / "valid" / "valid_result.csv").iloc[0]
    assert by_seed.loc[1, "pile"] == pytest.approx(valid1["pile"]) and "copa" not in valid1
    assert by_seed.loc[1, "pile"] != by_seed.loc[0, "pile"]  # another model, its own perplexity

    # mean ± CI over the two seeds, from the per-run rows
    table = pd.read_csv(out / "comparison.csv").set_index("method")
    from icu.comparison.stats import t_interval

    ci = t_interval(ga["heldout_loss"].tolist())
    assert table.loc["ga", "heldout_loss"] == pytest.approx(ci["mean"])
    assert table.loc["ga", "heldout_loss_ci"] == pytest.approx(ci["half"]) and table.loc["ga", "runs"] == 2
    assert "±" in (out / "comparison.md").read_text()

    # paired differences against the untrained model, run by run
    diff = pd.read_csv(out / "differences.csv")
    d = diff[(diff["method"] == "ga") & (diff["baseline"] == "original") & (diff["column"] == "heldout_loss")]
    orig = runs.loc[runs["method"] == "original", "heldout_loss"].iloc[0]
    assert len(d) == 1 and d["runs"].iloc[0] == 2
    assert d["diff"].iloc[0] == pytest.approx((ga["heldout_loss"] - orig).mean())
    # a second baseline adds its own rows: original − ga is the same difference, negated
    back = diff[(diff["method"] == "original") & (diff["baseline"] == "ga") & (diff["column"] == "heldout_loss")]
    assert len(back) == 1 and back["diff"].iloc[0] == pytest.approx(-d["diff"].iloc[0])
    assert back["ci"].iloc[0] == pytest.approx(d["ci"].iloc[0])
    # pile, scored on both seeds (--every_run_tasks), pairs too
    d = diff[(diff["method"] == "ga") & (diff["baseline"] == "original") & (diff["column"] == "pile")]
    orig = runs.loc[runs["method"] == "original", "pile"].iloc[0]
    assert d["runs"].iloc[0] == 2 and d["diff"].iloc[0] == pytest.approx((ga["pile"] - orig).mean())

    # trajectories: every validation's held-out loss; the stop point's equals the table's
    traj = pd.read_csv(out / "trajectories.csv")
    for _, row in ga.iterrows():
        t = traj[(traj["method"] == "ga") & (traj["seed"] == row["seed"])].sort_values("epoch")
        assert len(t) == row["epochs"] + 1 and t["heldout_loss"].notna().all()
        assert t["heldout_loss"].iloc[-1] == pytest.approx(row["heldout_loss"], rel=1e-9)
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"

    # membership inference per model: the memorizing toy model tells its targets apart
    assert runs.loc[runs["method"] == "original", "auc_min_k_pp"].iloc[0] > 0.8
    assert (out / "runs" / "mini" / "seed0" / "ga" / "membership.csv").is_file()

    # the forget-set evaluation is the last validation, and equals eval.py's own on that model
    md = out / "runs" / "mini" / "seed0" / "ga"
    assert (md / "eval" / "reused.json").is_file() and not (md / "eval.out").exists()
    import eval as eval_script

    run = json.loads((md / "train" / "run.json").read_text())
    eval_script.main(["--exp", "mini", "--data_dir", str(r / "data"), "--model_name", run["model_dir"], *OFFLINE,
                      "--batch_size", "4", "--dir", str(tmp_path / "direct"), "--no_progress"])
    direct = pd.read_csv(tmp_path / "direct" / "eval.csv").iloc[0]
    reused = pd.read_csv(md / "eval" / "eval.csv").iloc[0]
    for col in reused.index:
        assert reused[col] == pytest.approx(direct[col], rel=1e-9, abs=1e-12), col
    a = pd.read_csv(tmp_path / "direct" / "unlearn.csv")
    b = pd.read_csv(md / "eval" / "unlearn.csv")
    assert a.columns.tolist() == b.columns.tolist()
    pd.testing.assert_frame_equal(a, b, rtol=1e-9)

    # a rerun reuses every run and the tuning: no step runs again
    assert compare.main(argv) == 0
    log = (out / "compare.log").read_text().split(" comparing ")[-1]
    assert "] $ " not in log
    # a second worker taking seed 1 alone: with --tune_seed 0 it finds the tuning runs done
    # (without it the tuning would run on seed 1 and refuse the seed-0 runs already there);
    # with --task_runs 0 its seed 1 wants only --every_run_tasks, and the untrained model keeps all
    i = argv.index("--seeds")
    second = [*argv[:i], "--seeds", "1", "--tune_seed", "0", *argv[i + 2:]]
    second[second.index("--task_runs") + 1] = "0"
    assert compare.main(second) == 0
    log = (out / "compare.log").read_text().split(" comparing ")[-1]
    assert "] $ " not in log and "tuning ga: chose lr" in log
    again = pd.read_csv(out / "runs.csv").set_index("method")
    assert again.loc["original", ["copa", "pile"]].notna().all() and pd.isna(again.loc["ga", "copa"])


def test_tuning_targets_must_not_be_reported(study, tmp_path, capsys):
    for tune_exp in ("mini", "overlap"):
        with pytest.raises(SystemExit) as exc:
            compare.main(_argv(study, tmp_path / "o", "--tune_exp", tune_exp))
        assert exc.value.code == 2
        assert "shares" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(_argv(study, tmp_path / "o", "--lr_grid", "1e-4,2e-4"))  # no --tune_exp
    assert "needs --tune_exp" in capsys.readouterr().err
    for bad in (["--seeds", "0,x"], ["--lr_grid", "1e-4,-1", "--tune_exp", "tune"], ["--baseline", "icu"],
                ["--tune_seed", "0"], ["--tune_seed", "-1", "--lr_grid", "1e-4", "--tune_exp", "tune"]):
        with pytest.raises(SystemExit):
            compare.main(_argv(study, tmp_path / "o", *bad))
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "o").exists()
