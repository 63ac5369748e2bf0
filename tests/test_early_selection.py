"""Early-only selection (config.selection.until): the input switches from super-batches to
batches at the same place of the shuffled stream, resumes exactly on either side of the
switch, and the trainer selects, logs and counts FLOPs only before it."""

import json

import numpy as np
import pytest

from jest_pod import config as config_lib
from jest_pod.data import input_config, pipeline
from jest_pod.train import hooks
from jest_pod.train import main as train_main
from tests import helpers_data
from train_helpers import read_metrics, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return helpers_data.write_dataset(str(tmp_path_factory.mktemp("d")), 20)


def _switching(data, steps=2, first=8, then=4, pi=0, pc=1):
  config = input_config.default_input_config()
  config.data, config.worker_count = data, 0

  def make(global_batch, offset):
    return pipeline.make_train_iterator(config, global_batch_size=global_batch, seed=3,
                                        offset=offset, process_index=pi, process_count=pc)

  return pipeline.SwitchingIterator(make, steps=steps, first=first, then=then), make


def test_switch_continues_the_same_stream_in_smaller_batches(data):
  it, make = _switching(data)
  got = [next(it)["index"] for _ in range(6)]
  assert [len(g) for g in got] == [8, 8, 4, 4, 4, 4]
  plain = make(4, 0)
  want = [next(plain)["index"] for _ in range(8)]  # positions 0..31 in fours
  np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))  # crosses an epoch


@pytest.mark.parametrize("k", range(6))
def test_state_restores_exactly_on_either_side_of_the_switch(data, k):
  it, _ = _switching(data)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
  want = [next(it)["index"] for _ in range(3)]
  fresh, _ = _switching(data)
  fresh.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(fresh)["index"], w)


def test_two_hosts_split_each_phase_as_one_host_reads_it(data):
  single, _ = _switching(data)
  one = [next(single)["index"] for _ in range(5)]
  hosts = [_switching(data, pi=p, pc=2)[0] for p in (0, 1)]
  for step in range(5):
    halves = [next(h)["index"] for h in hosts]
    np.testing.assert_array_equal(np.concatenate(halves), one[step])


def test_until_is_validated():
  c = config_lib.base_config()
  c.selection.update(method="joint", reference="r", until=0.0)
  with pytest.raises(ValueError, match=r"config.selection.until=0.0 must be in \(0, 1\]"):
    config_lib.validate(c)
  c.selection.update(method="uniform", until=0.5)
  with pytest.raises(ValueError, match="until=0.5 needs a selecting method"):
    config_lib.validate(c)
  c.selection.update(method="joint", until=0.5)
  c.total_steps = 7
  assert config_lib.resolve(c).selection_steps == 4  # round(3.5) = 4 (banker's: 3.5 → 4)


def test_trainer_selects_until_the_switch_then_trains_uniform_and_resumes_exactly(
    toy, tmp_path, monkeypatch):
  """6 steps, until = 0.5: steps 1-3 select from N = 2B, steps 4-6 train on B. A run
  stopped at the switch (the input thread has read past it) and rerun ends as the
  uninterrupted run, step for step."""
  ref = str(tmp_path / "ref")
  train_main.train(tiny_config(toy, steps=2), ref)
  config = tiny_config(toy, steps=6, method="joint", reference=ref,
                       **{"selection.filter_ratio": 0.5, "selection.until": 0.5,
                          "selection.reference_cache": "off"})
  whole = str(tmp_path / "whole")
  train_main.train(config, whole)
  m = read_metrics(whole)
  assert all("select/learnability_selected" in m[s] for s in (1, 2, 3))
  assert not any(k.startswith("select/") for s in (4, 5, 6) for k in m[s])
  flops = json.loads(open(f"{whole}/flops.json").read())
  per_step = np.diff([0] + [m[s]["flops"] for s in range(1, 7)])
  np.testing.assert_allclose(per_step[:3], flops["charged"])
  np.testing.assert_allclose(per_step[3:], flops["after_selection"]["charged"])
  assert flops["after_selection"]["charged"] < flops["charged"] / 2
  assert all(m[s]["time/train_elapsed_s"] > 0 for s in m)

  stopped = str(tmp_path / "stopped")
  with monkeypatch.context() as mp:
    mp.setattr(hooks.Preemption, "agreed", lambda self, step: step == 3)
    last = train_main.train(config, stopped)
  assert last["preempted"] and last["step"] == 3
  seconds = read_metrics(stopped)[3]["time/train_elapsed_s"]
  train_main.train(config, stopped)
  again = read_metrics(stopped)
  for s in range(1, 7):
    np.testing.assert_allclose(again[s]["train/loss"], m[s]["train/loss"], rtol=1e-5, atol=1e-5)
  assert again[4]["time/train_elapsed_s"] > seconds  # the timer carries on from the checkpoint
  # Resumed past the switch with more steps, the switch would move to step 6: steps 6-11
  # would "select" a batch of B from a batch of B. Refused, naming both keys' way back.
  longer = tiny_config(toy, steps=12, method="joint", reference=ref,
                       **{"selection.filter_ratio": 0.5, "selection.until": 0.5,
                          "selection.reference_cache": "off"})
  with pytest.raises(ValueError, match=r"config.total_steps: 6 → 12 moves the switch .* from "
                     r"step 3 to step 6, but the checkpoint at step 6 is already past"):
    train_main.train(longer, whole)
  assert max(read_metrics(whole)) == 6  # nothing ran
