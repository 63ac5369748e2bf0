"""The Grain pipeline: contents, per-epoch reshuffle, skipping, exact resume, mixtures,
per-host slicing (two real processes), eval padding, and the 2^33-record source."""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from grain._src.python.experimental.index_shuffle.python import index_shuffle_module
from jest_pod.data import decode, input_config, pipeline, prefetch, records, sources, tokenizer, virtual
from tests import helpers_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  return helpers_data.write_dataset(str(tmp_path_factory.mktemp("toy")), 20)


@pytest.fixture(scope="module")
def toy_bad(tmp_path_factory):
  return helpers_data.write_dataset(str(tmp_path_factory.mktemp("bad")), 20,
                                    bad_proto={3}, bad_image={11, 12})


def _config(data, **kw):
  c = input_config.default_input_config()
  c.data = data
  c.worker_count = 0  # the default (-1, auto) depends on the host's cores
  for k, v in kw.items():
    c[k] = v
  return c


def _train(config, batch, seed=0, pi=0, pc=1):
  return pipeline.make_train_iterator(config, global_batch_size=batch, seed=seed,
                                      process_index=pi, process_count=pc)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_contents_match_records(toy):
  b = next(_train(_config(toy, image_size=16, max_text_len=8), 6))
  assert b["image"].shape == (6, 16, 16, 3) and b["image"].dtype == np.float32
  assert b["image"].min() >= -1 and b["image"].max() <= 1
  assert b["text"].shape == (6, 8) and b["text"].dtype == np.int32
  assert b["index"].dtype == np.int64 and b["label"].dtype == np.int32
  assert b["source"].dtype == np.int32 and b["skipped"].dtype == np.int32
  tok = tokenizer.Tokenizer(os.path.join(toy, "tokenizer.model"))
  names = sources.source_names(_config(toy))
  for k, i in enumerate(b["index"]):
    rec = helpers_data.toy_record(int(i))
    np.testing.assert_array_equal(b["text"][k], tok.encode_batch([rec.text], 8)[0])
    assert b["label"][k] == rec.label and names[b["source"][k]] == rec.source
    # decode.to_array itself is checked against PIL in test_decode.py.
    np.testing.assert_array_equal(b["image"][k], decode.to_array(rec.image, 16))


def test_pool_size_trains_on_a_fixed_subset_for_every_seed(toy):
  def indices(seed):
    it = _train(_config(toy, pool_size=8), 4, seed=seed)
    return np.concatenate([next(it)["index"] for _ in range(6)]).reshape(3, 8)

  a, b = indices(0), indices(1)
  pool = sorted(a[0].tolist())
  assert len(set(pool)) == 8 and pool != list(range(8))  # a random subset of the 20
  for epoch in (*a, *b):  # every epoch of every seed covers exactly that subset
    assert sorted(epoch.tolist()) == pool
  assert not np.array_equal(a, b)  # ... in each seed's own order
  # `index` stays the record's index in the whole set (what a reference cache is keyed by).
  batch = next(_train(_config(toy, pool_size=8, max_text_len=8), 4))
  tok = tokenizer.Tokenizer(os.path.join(toy, "tokenizer.model"))
  for k, i in enumerate(batch["index"]):
    np.testing.assert_array_equal(
        batch["text"][k], tok.encode_batch([helpers_data.toy_record(int(i)).text], 8)[0])
  with pytest.raises(ValueError, match="pool_size=21"):
    _train(_config(toy, pool_size=21), 4)


def test_reshuffles_every_epoch_and_covers_each_epoch(toy):
  it = _train(_config(toy), 5)
  order = np.concatenate([next(it)["index"] for _ in range(12)])  # 3 epochs of 20
  epochs = order.reshape(3, 20)
  for e in epochs:
    assert sorted(e.tolist()) == list(range(20))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(20))
  # Another seed, another order; the same seed, the same order.
  other = np.concatenate([next(_train(_config(toy), 20, seed=1))["index"]])
  same = np.concatenate([next(_train(_config(toy), 20, seed=0))["index"]])
  assert not np.array_equal(other, epochs[0]) and np.array_equal(same, epochs[0])


def test_bad_records_are_skipped_and_counted(toy_bad):
  config = _config(toy_bad)
  it = _train(config, 6)
  batches = [next(it) for _ in range(6)]  # 36 good examples = 2 epochs of 17 + 2
  idx = np.concatenate([b["index"] for b in batches])
  assert not set(idx.tolist()) & {3, 11, 12}
  # Expected count: bad positions of the shuffled stream before the 36th good example.
  ds = pipeline.train_map_dataset(config, seed=0, process_index=0, process_count=1)
  good = bad = 0
  for k in range(100):
    if "bad" in ds[k]:
      bad += 1
    else:
      good += 1
      if good == 36:
        break
  assert sum(int(b["skipped"].sum()) for b in batches) == bad >= 4


@pytest.mark.parametrize("workers", [0, 1])  # 2 workers: same path, 2x the spawns
def test_state_restores_exactly(toy_bad, workers):
  config = _config(toy_bad, worker_count=workers)
  it = _train(config, 4)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (17 good / epoch)
  it.close()  # free its worker processes before starting the fresh iterator's
  fresh = _train(config, 4)
  fresh.set_state(state)
  for want in expected:
    _assert_batches_equal(next(fresh), want)
  # State is JSON-serialisable (grain.checkpoint writes it as JSON).
  json.dumps(state)
  fresh.close()


def test_mixture_weights_and_unique_source_ids(tmp_path):
  a = helpers_data.write_dataset(str(tmp_path / "a"), 12, origin="alpha")
  b = helpers_data.write_dataset(str(tmp_path / "b"), 12, origin="beta")
  config = _config("", mixture=[(a, 3.0), (b, 1.0)])
  names = sources.source_names(config)
  assert names == ["alpha", "alpha:junk_image", "beta", "beta:junk_image"]
  it = _train(config, 40)
  src = np.concatenate([next(it)["source"] for _ in range(2)])
  from_a = np.isin(src, [0, 1]).sum()
  assert from_a == 60  # grain mixes deterministically by proportion: exactly 3:1
  batch = next(_train(config, 40))
  for s, i in zip(batch["source"], batch["index"]):
    origin = names[s].split(":")[0]
    assert helpers_data.toy_record(int(i), origin).source == names[s]


def test_batch_must_divide_over_processes(toy):
  with pytest.raises(ValueError, match="divisible"):
    _train(_config(toy), 6, pi=0, pc=4)


def test_missing_tokenizer_names_path_and_command(tmp_path):
  d = helpers_data.write_dataset(str(tmp_path / "d"), 4)
  os.remove(os.path.join(d, "tokenizer.model"))
  with pytest.raises(tokenizer.TokenizerError, match="jest-pod data tokenizer --data"):
    _train(_config(d), 2)


_HOST_SCRIPT = """
import sys, json, numpy as np
sys.path.insert(0, {repo!r})
from jest_pod.data import input_config, pipeline
c = input_config.default_input_config(); c.data = {data!r}; c.worker_count = 0
it = pipeline.make_train_iterator(c, global_batch_size={gb}, seed=7,
                                  process_index={pi}, process_count={pc})
print(json.dumps([next(it)["index"].tolist() for _ in range({steps})]))
"""


def _host_run(data, gb, pi, pc, steps):
  code = _HOST_SCRIPT.format(repo=REPO, data=data, gb=gb, pi=pi, pc=pc, steps=steps)
  return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_two_hosts_split_the_global_order(tmp_path):
  data = helpers_data.write_dataset(str(tmp_path / "d"), 40)
  steps, gb = 5, 8  # exactly one epoch: every example once
  procs = [_host_run(data, gb, p, 2, steps) for p in (0, 1)]
  it = _train(_config(data), gb, seed=7)  # one host reading the full global batch
  single = np.array([next(it)["index"].tolist() for _ in range(steps)])
  host0, host1 = [np.array(json.loads(p.communicate(timeout=120)[0])) for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert host0.shape == host1.shape == (steps, gb // 2)
  assert not set(host0.ravel()) & set(host1.ravel())
  assert sorted(np.concatenate([host0.ravel(), host1.ravel()])) == list(range(40))
  for s in range(steps):
    # Same global order: host p holds the p-th contiguous half of the single host's batch.
    np.testing.assert_array_equal(host0[s], single[s][:gb // 2])
    np.testing.assert_array_equal(host1[s], single[s][gb // 2:])


def test_eval_iterator_pads_and_slices(toy_bad):
  seen, n_batches = [], []
  for pi in range(3):
    batches = list(pipeline.make_eval_iterator(
        toy_bad, batch_size=3, image_size=8, max_text_len=6, tokenizer="",
        process_index=pi, process_count=3))
    n_batches.append(len(batches))
    for b in batches:
      assert b["image"].shape == (3, 8, 8, 3) and b["mask"].dtype == np.float32
      real = b["mask"] == 1
      seen += b["index"][real].tolist()
      # A bad record is masked and counted; padding is masked and not counted.
      assert set(b["index"][b["skipped"] == 1].tolist()) <= {3, 11, 12}
      assert (b["mask"][b["skipped"] == 1] == 0).all()
  assert n_batches == [3, 3, 3]  # ceil(ceil(20 / 3) / 3) on every host
  assert sorted(seen) == sorted(set(range(20)) - {3, 11, 12})
  # Host 0 reads 0, 3, 6, ... in order.
  b0 = next(pipeline.make_eval_iterator(toy_bad, batch_size=3, image_size=8, max_text_len=6,
                                        process_index=0, process_count=3))
  assert b0["index"].tolist() == [0, 3, 6] and b0["mask"].tolist() == [1, 0, 1]


# ---------------------------------------------------------------------------------------
# The 2^33-record virtual source.

_VIRTUAL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
t = time.perf_counter()
from jest_pod.data import input_config, pipeline
c = input_config.default_input_config(); c.data = "virtual"; c.tokenizer = {tok!r}
c.worker_count = 0
it = pipeline.make_train_iterator(c, global_batch_size=64, seed=0, process_index=0,
                                  process_count=1)
b = next(it)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forking parent.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(time.perf_counter() - t, int(hwm) * 1024)
"""


def test_virtual_first_batch_is_fast_and_small(toy):
  code = _VIRTUAL_SCRIPT.format(repo=REPO, tok=os.path.join(toy, "tokenizer.model"))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True)
  seconds, rss = map(float, out.stdout.split())
  assert len(virtual.VirtualSource()) == 2**33
  assert seconds < 30 and rss < 1e9, (seconds, rss)


def test_a_new_source_kind_is_one_registry_entry(toy, monkeypatch):
  # "mem:N": the first N records of the toy folder, named through sources.KINDS only.
  folder = sources.KINDS[sources.FOLDER]
  def open_mem(spec):
    src, names = folder.open(toy)
    return [src[i] for i in range(int(spec.split(":")[1]))], names
  mem_names = list(folder.manifest(toy)["sources"])  # the kind's own copy of the names
  kind = sources.SourceKind(open=lambda spec: (open_mem(spec)[0], mem_names),
                            manifest=lambda spec: {"sources": mem_names},
                            tokenizer=lambda spec: folder.tokenizer(toy),
                            fingerprint=lambda spec: {"num_examples": int(spec[4:])},
                            captions=lambda spec: sources.read_captions(open_mem(spec)[0]))
  monkeypatch.setitem(sources.KINDS, "mem", kind)
  assert sources.scheme("mem:5") == "mem" and not sources.is_folder("mem:5")
  assert sources.source_names(_config("mem:5")) == mem_names  # read through the kind
  b = next(_train(_config("mem:5", image_size=8, max_text_len=6), 5))
  assert sorted(b["index"].tolist()) == [0, 1, 2, 3, 4]
  assert (b["source"] >= 0).all()  # every record's source found among the kind's names
  for k, i in enumerate(b["index"]):  # ... and batch["source"] indexes them
    assert mem_names[b["source"][k]] == helpers_data.toy_record(int(i)).source
  assert sources.tokenizer_path("virtual") is None
  with pytest.raises(tokenizer.TokenizerError, match="virtual source has no tokenizer"):
    tokenizer.resolve(_config("virtual"))


def test_virtual_restore_deep_is_as_fast_and_exact(toy):
  config = _config("virtual", tokenizer=os.path.join(toy, "tokenizer.model"))
  tok = tokenizer.Tokenizer(config.tokenizer)
  seed, b = 3, 16

  def restore_and_read(position):
    it = _train(config, b, seed=seed)
    t = time.perf_counter()
    it.set_state({"next_index": position})
    batch = next(it)
    return time.perf_counter() - t, batch

  restore_and_read(0)  # warm-up: imports, PIL plugins
  t0, _ = restore_and_read(0)
  pos = 10**9
  t_deep, batch = restore_and_read(pos)
  assert t_deep < 10 * t0 + 0.5, (t0, t_deep)
  # Position k of epoch 0 holds the source record at the seeded index_shuffle of k.
  n = 2**33
  want = [index_shuffle_module.index_shuffle(pos + k, max_index=n - 1,
                                             seed=pipeline._component_seed(seed, 0), rounds=4)
          for k in range(b)]
  assert batch["index"].tolist() == want
  for k, i in enumerate(want):
    rec = virtual.record(i)
    assert records.decode(virtual.VirtualSource()[i]) == rec
    np.testing.assert_array_equal(batch["text"][k], tok.encode_batch([rec.text], 16)[0])
    assert batch["label"][k] == rec.label and batch["source"][k] == 0
  assert (batch["skipped"] == 0).all()


def test_worker_count_auto_resolves():
  assert input_config.default_input_config().worker_count == -1
  auto = pipeline.resolve_worker_count(-1)
  assert isinstance(auto, int) and 0 <= auto <= pipeline.AUTO_MAX_WORKERS
  assert auto == pipeline.resolve_worker_count(-1, pipeline.usable_cpus())
  assert [pipeline.resolve_worker_count(-1, n) for n in (1, 2, 3, 8, 64)] == [0, 0, 2, 7, 16]
  assert pipeline.resolve_worker_count(0) == 0 and pipeline.resolve_worker_count(3) == 3
  with pytest.raises(ValueError, match="worker_count"):
    pipeline.resolve_worker_count(-2)


def _jpeg(w, h):
  rng = np.random.default_rng(0)
  arr = np.clip(rng.normal(128, 30, (h, w, 3)) + np.linspace(0, 80, w)[None, :, None],
                0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=90)
  return buf.getvalue(), arr


def test_decode_jpeg_record(toy):
  tok = tokenizer.Tokenizer(os.path.join(toy, "tokenizer.model"))
  rec = records.Record(image=_jpeg(256, 256)[0], text="a red thing", id="j", source="toy")
  d = pipeline._Decode(16, 8, tok, [{"toy": 0}])
  ex = d.map({"raw": records.encode(rec), "index": 5, "component": 0})
  assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.float32
  np.testing.assert_array_equal(ex["text"], tok.encode_batch(["a red thing"], 8)[0])
  assert ex["source"] == 0 and ex["index"] == 5 and ex["label"] == -1


def test_chunked_prefetch_keeps_order_and_exact_state():
  import grain
  ds = grain.MapDataset.range(50).map(lambda i: {"i": i})
  it = iter(prefetch.ChunkedPrefetch(ds, num_threads=3, chunk=4, ahead=3))
  got = [next(it)["i"] for _ in range(7)]
  state = it.get_state()
  assert got == list(range(7)) and state == {"next_index": 7}
  rest = [e["i"] for e in it]
  assert rest == list(range(7, 50))
  fresh = iter(prefetch.ChunkedPrefetch(ds, num_threads=2, chunk=5, ahead=2))
  fresh.set_state(state)  # not on a chunk boundary
  assert [next(fresh)["i"] for _ in range(5)] == list(range(7, 12))
  fresh.close()
  it.close()


def test_in_process_order_equals_grain_prefetch(toy_bad):
  # worker_count 0 (ChunkedPrefetch) yields what Grain's own prefetch yields.
  config = _config(toy_bad, image_size=8)
  ds = pipeline.train_map_dataset(config, seed=0, process_index=0, process_count=1, block=4)
  import grain
  want = prefetch.SkipBad(ds.to_iter_dataset(grain.ReadOptions(num_threads=2))).batch(4)
  want, got = iter(want), _train(config, 4)
  for _ in range(6):
    _assert_batches_equal(next(got), next(want))


def test_a_source_kind_owns_its_fingerprint_captions_and_sets(toy, monkeypatch, tmp_path):
  # What the reference cache, the tokenizer trainer and eval discovery ask a kind: the
  # folder answers from its files, "mem" (tests/helpers_data.mem_kind) through the registry.
  monkeypatch.setitem(sources.KINDS, "mem", helpers_data.mem_kind(toy))
  fp = sources.fingerprint(toy)
  assert fp["num_examples"] == 20 and len(fp["shards"]) == 2
  assert sources.fingerprint("mem:5") == {"num_examples": 5, "of": fp}
  assert sources.fingerprint("mem:5") != sources.fingerprint("mem:6")
  want = [helpers_data.toy_record(i).text for i in range(20)]
  assert list(sources.captions(toy)) == want
  assert list(sources.captions("mem:5")) == want[:5]
  assert list(sources.captions("virtual:3")) == [virtual.record(i).text for i in range(3)]
  assert sources.fingerprint("virtual:3")["num_examples"] == 3
  assert sources.exists(toy) and sources.exists("mem:5") and sources.exists("virtual")
  os.symlink(toy, tmp_path / "eval_toy")
  os.makedirs(tmp_path / "eval_unbuilt")  # no manifest: not a data set
  assert not sources.exists(str(tmp_path / "eval_unbuilt"))
  assert sources.sets(str(tmp_path)) == {"eval_toy": str(tmp_path / "eval_toy")}
  assert sources.sets("mem") == {"eval_captions": "mem:8", "eval_labelled": "mem:8:labelled",
                                 "web": "mem:20"}
  assert sources.sets("virtual") == {}


def test_captions_skip_unreadable_records(toy_bad):
  # Both paths skip what the pipeline skips: the folder's sequential reader and
  # `read_captions` over a random-access source (other kinds' default).
  want = [helpers_data.toy_record(i).text for i in range(20) if i != 3]
  assert list(sources.captions(toy_bad)) == want
  assert list(sources.read_captions(sources.open_source(toy_bad)[0])) == want

