"""`jest-pod sweep`: crossing points, damage shares, and a 2-seed smoke sweep end to end."""

import json
import os

import numpy as np
import pytest

from jest_pod import sweep


def test_examples_to_reach_interpolates_between_evaluations():
  xs, ys = np.array([0.0, 100.0, 200.0]), np.array([0.1, 0.3, 0.5])
  assert sweep.examples_to_reach(xs, ys, 0.4) == pytest.approx(150.0)
  assert sweep.examples_to_reach(xs, ys, 0.3) == pytest.approx(100.0)
  assert sweep.examples_to_reach(xs, ys, 0.05) == 0.0
  assert sweep.examples_to_reach(xs, ys, 0.6) is None
  # The first crossing counts, not a later dip and recovery.
  assert sweep.examples_to_reach(xs, np.array([0.1, 0.5, 0.2]), 0.3) == pytest.approx(50.0)


def test_damage_shares_group_origins_by_damage_kind():
  events = [
      {"step": 10, "select/share/emoji": 0.6, "pool/share/emoji": 0.4,
       "select/share/emoji/junk_image": 0.1, "pool/share/emoji/junk_image": 0.3,
       "select/share/clip/junk_image": 0.3, "pool/share/clip/junk_image": 0.3},
      {"step": 20, "select/share/emoji": 0.4, "pool/share/emoji": 0.4,
       "select/share/emoji/junk_image": 0.3, "pool/share/emoji/junk_image": 0.3,
       "select/share/clip/junk_image": 0.3, "pool/share/clip/junk_image": 0.3},
      {"step": 20, "z/0shot/x_top1": 0.5},  # evaluations carry no shares: ignored
  ]
  shares = sweep._damage_shares(events)
  assert shares["clean"] == pytest.approx((0.5, 0.4))
  assert shares["junk_image"] == pytest.approx((0.5, 0.6))


def test_bad_arguments_exit_2_with_a_message(capsys):
  assert sweep.main(["--only", "f,nope"]) == 2
  assert "nope" in capsys.readouterr().err
  assert sweep.main(["--seeds", "0,x"]) == 2
  assert "--seeds" in capsys.readouterr().err


def test_smoke_sweep_trains_reports_and_resumes(tmp_path, monkeypatch, capsys):
  # Relative paths on purpose: the default workdir is relative and Orbax needs absolute.
  monkeypatch.chdir(tmp_path)
  # Children get 1 XLA CPU device each, as on a real 2-core machine (not the tests' 8 fake
  # ones, which only slow their compiles).
  monkeypatch.setenv("XLA_FLAGS", "")
  argv = ["--scale", "smoke", "--data", "data", "--workdir", "wd", "--seeds", "0,1",
          "--only", "flexi", "--jobs", "2"]
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "6 runs (3 variants × 2 seeds), 0 already done; 2 at a time, 1 CPU device(s)" in out
  assert "est. remaining" in out
  results = json.load(open("wd/sweep_results.json"))
  analysis = results["analysis"]

  # The target is uniform's final zero-shot, mean over seeds, read back from the runs' logs.
  finals = []
  for seed in (0, 1):
    events = [json.loads(line) for line in open(f"wd/runs/uniform/seed{seed}/metrics.jsonl")]
    finals.append([e for e in events if sweep.ZERO_SHOT in e][-1][sweep.ZERO_SHOT])
  assert analysis["targets"]["zero_shot"] == pytest.approx(np.mean(finals))

  jest = analysis["variants"]["jest_f80"]
  assert jest["seeds"] == [0, 1]
  # Scoring and the reference forward make a JEST step dearer than a uniform one, and
  # full-resolution scoring dearer than Flexi's patch-2p scoring.
  uniform_step = analysis["variants"]["uniform"]["flops_per_step"]
  fullres_step = analysis["variants"]["fullres_f80"]["flops_per_step"]
  assert fullres_step > jest["flops_per_step"] > uniform_step
  # FLOPs to reach = examples to reach × FLOPs per example; "+ref" adds the reference's
  # training for runs that use a reference only. Checked wherever a seed reached the target:
  # some uniform seed always reaches its own seeds' mean, so the loop cannot be empty.
  ref_share = analysis["reference_training_flops"] / analysis["uniform_flops"]
  checked = 0
  for name, row in analysis["variants"].items():
    reach = row["reach"]["zero_shot"]
    for frac, ratio, with_ref in zip(reach["examples_frac"], reach["flops_ratio"],
                                     reach["flops_ratio_incl_ref"]):
      if frac is not None:
        assert ratio == pytest.approx(frac * row["flops_per_step"] / uniform_step)
        assert with_ref == pytest.approx(ratio + (0 if name == "uniform" else ref_share))
        checked += 1
  assert checked > 0
  assert set(jest["damage"]["0"]) >= {"clean", "swapped_caption", "junk_image"}

  # The damage table reports whichever selection runs have finished (here the flexi pair).
  assert sweep.main([*argv[:-4], "--only", "flexi,damage", "--report-only"]) == 0
  capsys.readouterr()
  report = open("wd/sweep_report.md").read()
  for label in ("| uniform |", "| JEST f=80% |", "| JEST f=80%, full-res scoring |",
                "swapped_caption", "Regenerate: `jest-pod sweep --scale smoke"):
    assert label in report
  for exp in ("flexi", "damage"):
    assert os.path.getsize(f"wd/sweep_{exp}.png") > 1000

  # A rerun trains nothing and rewrites the report.
  os.remove("wd/sweep_report.md")
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert "6 already done" in out and "[sweep] start" not in out
  assert os.path.exists("wd/sweep_report.md")

  # Another plan in the same workdir is refused rather than mixed into one comparison.
  assert sweep.main(["--data", "data", "--workdir", "wd", "--report-only"]) == 2
  assert "another plan" in capsys.readouterr().err
