"""Data mixtures (`trainer.mixture`): each source's share of the global batches is within ±1% of its weight over
200 steps, the same at 1, 2 and 3 workers and across a resume at another world size; a schedule switches at exactly
its step; a source that runs out starts a new epoch; and bad mixtures are one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.config import ConfigError, load_config
from data_pipeline.config import DataError
from data_pipeline.manifest import read_manifest
from tests.conftest import SHAKESPEARE
from tests.trainer.test_data import hand_made_data
from trainer.data import SampleReader, rank_steps
from trainer.mixture import D, MixtureOrder, Phase, Sources, integer_weights, moved_boundaries

SIZES = [9, 7, 5, 3, 2, 4]  # 30 train blocks in 6 shards
SOURCES = ["web", "web", "web", "code", "math", "math"]  # web 21 blocks, code 3, math 6
WEIGHTS = {"web": 0.5, "code": 0.2, "math": 0.3}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hand_made_data(tmp_path_factory.mktemp("mix"), SIZES, sources=SOURCES)


def _trained(data: Path, sources: Sources, world: int, first: int, steps: int, batch: int, micro: int) -> list[np.ndarray]:
    """The sample ids every rank of a `world`-sized group trains on at each step (rank order), read through the
    real reader: a block's first token names it (1000·shard + index)."""
    reader = SampleReader(data, "train")
    ranks = [rank_steps(reader, sources.order, first, batch, micro, r, world) for r in range(world)]
    steps_ids = []
    for _ in range(steps):
        parts = [next(it) for it in ranks]
        steps_ids.append(np.concatenate([p.ids for p in parts]))
        names = np.concatenate([np.concatenate([m[:, 0] for m in p.micro_batches if len(m)]) for p in parts])
        assert names.tolist() == [_name(int(i)) for i in steps_ids[-1]]  # the blocks read are those ids
    for it in ranks:
        it.close()
    reader.close()
    return steps_ids


def _name(sample: int) -> int:
    """The first token of a sample id's block in the hand-made data."""
    for shard, n in enumerate(SIZES):
        if sample < n:
            return 1000 * shard + sample
        sample -= n
    raise AssertionError("outside the data")


def test_each_source_gets_its_share_at_every_world_size_and_across_a_resize(data: Path) -> None:
    manifest = read_manifest(data)
    assert {n: r for n, r in manifest.source_ranges("train").items()} == {"web": (0, 21), "code": (21, 3), "math": (24, 6)}
    sources = Sources(manifest, [(None, WEIGHTS)], seed=7)
    runs = {world: _trained(data, sources, world, 0, 200, 12, 2) for world in (1, 2, 3)}
    resized = _trained(data, sources, 2, 0, 90, 12, 3) + _trained(data, sources, 3, 90, 110, 12, 2)
    for ids in (*runs.values(), resized):
        assert [i.tolist() for i in ids] == [i.tolist() for i in runs[1]]  # the same samples, in the same order
    taken = np.concatenate(runs[1])
    source = sources.order.source_of(taken)
    shares = np.bincount(source, minlength=3) / len(taken)
    assert np.abs(shares - [0.5, 0.2, 0.3]).max() <= 0.01, shares
    consumed = sources.consumed(200, 12)
    assert consumed.tolist() == np.bincount(source, minlength=3).tolist()  # the metrics' count, computed directly
    # every source is its own stream of epochs: the 3 code blocks are used once each in every 3 code slots
    code = taken[source == 1]
    assert all(sorted(code[i : i + 3].tolist()) == [21, 22, 23] for i in range(0, len(code) - 2, 3))
    metrics = sources.metrics(200, 12, block_tokens=4)
    assert metrics["source_epoch"] == {"web": consumed[0] // 21, "code": consumed[1] // 3, "math": consumed[2] // 6}
    assert sum(metrics["source_tokens"].values()) == 200 * 12 * 4


def test_a_schedule_switches_at_exactly_its_step_and_a_resume_anywhere_continues_it(data: Path) -> None:
    phases = [(50, {"web": 1.0}), (120, {"code": 1.0, "math": 1.0}), (None, WEIGHTS)]
    sources = Sources(read_manifest(data), phases, seed=3)
    batches = [sources.order.global_batch(s, 8) for s in range(160)]
    source = [set(sources.order.source_of(b).tolist()) for b in batches]
    assert all(s == {0} for s in source[:50]) and all(s <= {1, 2} for s in source[50:120])  # steps 1-50, 51-120
    assert any(0 in s for s in source[120:]) and all(s <= {0, 1, 2} for s in source[120:])
    for step in (0, 49, 50, 51, 119, 120, 137):  # a fresh order at any step gives what the running one gave
        assert Sources(read_manifest(data), phases, seed=3).order.global_batch(step, 8).tolist() == batches[step].tolist()
    second = np.concatenate(batches[50:120])
    shares = np.bincount(sources.order.source_of(second), minlength=3) / len(second)
    assert shares[0] == 0 and abs(shares[1] - 0.5) <= 0.01
    assert sources.metrics(50, 8, 4)["source_tokens"] == {"web": 50 * 8 * 4, "code": 0, "math": 0}


def test_integer_weights_and_the_slot_sequence() -> None:
    weights = integer_weights([0.7, 0.2, 0.1])
    assert weights.sum() == D and np.abs(weights - np.array([0.7, 0.2, 0.1]) * D).max() < 1
    order = MixtureOrder([0, 10, 20], [10, 10, 10], [Phase(None, weights)], seed=0)
    assert order.consumed(D // 4, 4).tolist() == weights.tolist()  # D slots: exactly W_k each
    for start in (0, 1000, 123457):  # any run of 1,000 slots is within a few slots of its share
        counts = np.bincount(order._sources(0, start, 1000), minlength=3)
        assert np.abs(counts - weights / D * 1000).max() <= 3, counts


def test_moving_a_phase_end_that_is_still_ahead_continues_the_run() -> None:
    old = [[9000, {"web": 0.7, "code": 0.3}], [None, {"web": 1.0}]]
    assert moved_boundaries(old, [[12000, {"web": 0.7, "code": 0.3}], [None, {"web": 1.0}]], step=5000)
    assert moved_boundaries(old, [[6000, {"web": 0.7, "code": 0.3}], [None, {"web": 1.0}]], step=6000)
    assert not moved_boundaries(old, [[4000, {"web": 0.7, "code": 0.3}], [None, {"web": 1.0}]], step=5000)
    assert not moved_boundaries(old, [[12000, {"web": 0.6, "code": 0.4}], [None, {"web": 1.0}]], step=5000)
    assert not moved_boundaries(old, old, step=5000) and not moved_boundaries(None, old, step=1)


def _data_config(*overrides: str):
    return load_config(SHAKESPEARE, ["run_dir=/tmp/unused", *overrides]).data


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.sources=[{path: a.txt, weight: 0}]"], "data.sources[0].weight: Input should be greater than 0 (got 0)"),
    (["data.sources=[{path: a.txt, weight: -1}]"], "greater than 0"),
    (["data.sources=[{path: a.txt, weight: 1}, {path: b.txt}]"], "give a weight to every source or to none"),
    (["data.sources=[{path: a.txt, name: web}]", "data.mixture=[{weights: {code: 1}}]"],
     "mixture[0] names code: no such source (sources: web)"),
    (["data.sources=[{path: a.txt, name: web}]", "data.mixture=[{weights: {web: 0}}]"], "greater than 0"),
    (["data.sources=[{path: a.txt, name: web}]", "data.mixture=[{weights: {web: 1}, until_step: 5}]"],
     "every phase but the last needs an until_step"),
    (["data.sources=[{path: a.txt, name: web}, {path: b.txt, name: web}]"], "source names repeat: web"),
    (["data.sources=[{path: a.txt, name: 'a b'}]"], "data.sources[0].name"),
])
def test_bad_mixtures_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _data_config(*overrides)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_default_names_and_phases() -> None:
    cfg = _data_config("data.sources=[{path: /x/web.jsonl}, {path: /y/web.txt}, {path: '/z/*.py'}]")
    assert cfg.source_names() == ["web", "web-2", "z"] and cfg.phases() is None
    cfg = _data_config("data.sources=[{path: a.txt, weight: 3}, {path: b.txt, weight: 1}]")
    assert cfg.phases() == [(None, {"a": 3.0, "b": 1.0})]
    mixed = _data_config("data.sources=[{path: a.txt}, {path: b.txt}]",
                         "data.mixture=[{until_step: 10, weights: {a: 1}}, {weights: {a: 1, b: 1}}]")
    assert mixed.phases() == [(10, {"a": 1.0}), (None, {"a": 1.0, "b": 1.0})]
    assert mixed.output_hash() == _data_config("data.sources=[{path: a.txt}, {path: b.txt}]").output_hash()


def test_a_mixture_the_data_cannot_serve_is_one_line(data: Path, tmp_path: Path) -> None:
    manifest = read_manifest(data)
    with pytest.raises(DataError, match="names books, which the prepared data does not hold"):
        Sources(manifest, [(None, {"web": 1.0, "books": 1.0})], seed=0)
    raw = json.loads((data / "manifest.json").read_text())  # a source that kept no block: listed, without shards
    raw["sources"].append({"name": "books", "splits": {s: {k: 0 for k in ("blocks", "tokens", "documents",
                                                                          "doc_tokens", "text_bytes")} for s in ("train", "val")}})
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="gives a weight to books, which has no train block"):
        Sources(read_manifest(tmp_path), [(None, {"web": 1.0, "books": 1.0})], seed=0)
    assert Sources(read_manifest(tmp_path), [(None, {"web": 1.0})], seed=0).names == ["web", "code", "math", "books"]


STEPS, BATCH = 200, 8
MIXTURE = "data.mixture=[{{until_step: {until}, weights: {{a: 0.7, b: 0.3}}}}, {{weights: {{a: 0.2, b: 0.3, c: 0.5}}}}]"


def test_a_mixture_trains_exactly_its_schedule_across_a_resize(
    ray_session: None, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three sources (thirds of tinyshakespeare) prepared into one data dir, then 200 steps of a two-phase mixture:
    2 workers to step 60, 1 worker to the end, the first phase extended from step 100 to 110 in between (both ends
    still ahead: the same run). Every step trains on exactly the global batch the schedule defines; the metrics' tokens
    per source show each phase's shares within ±1% and the switch at exactly step 111; eval reports each source's val
    bits per byte."""
    from cluster import pipeline
    from cluster.cli import main
    from evaluation.config import EvalConfig
    from evaluation.run import evaluate_checkpoint
    from tests.conftest import BASE
    from trainer.metrics import batch_digest

    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    thirds = [text[: len(text) * 2 // 5], text[len(text) * 2 // 5 : len(text) * 7 // 10], text[len(text) * 7 // 10 :]]
    for name, part in zip("abc", thirds):
        (tmp_path / f"{name}.txt").write_text(part)
    run_dir = tmp_path / "run"
    sources = "data.sources=[" + ", ".join(f"{{path: {tmp_path / n}.txt, split_by: paragraph}}" for n in "abc") + "]"
    common = [sources, "data.tokenizer.vocab_size=512", "data.seq_len=64", "data.shard_bytes=100000", *BASE,
              "train.precision=fp32", f"train.global_batch_size={BATCH}", "train.eval_every=1000",
              "train.log_every=1", "cluster.cpus_per_worker=1"]
    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}", *common]) == 0
    manifest = read_manifest(run_dir / "data")
    assert [s.name for s in manifest.sources] == ["a", "b", "c"] and all(s.splits["train"].blocks for s in manifest.sources)

    def train(*overrides: str) -> None:
        pipeline.run_train(load_config(SHAKESPEARE, [f"run_dir={run_dir}", *common, *overrides]))

    train(MIXTURE.format(until=100), "train.max_steps=60", "train.checkpoint_every=60", "cluster.num_workers=2")
    capsys.readouterr()
    with pytest.raises(Exception, match="data.mixture"):  # other weights: another run, refused before any worker
        train(MIXTURE.format(until=100).replace("0.7", "0.6").replace("0.3}", "0.4}"), "train.max_steps=200")
    train(MIXTURE.format(until=110), f"train.max_steps={STEPS}", "train.checkpoint_every=100", "cluster.num_workers=1")
    assert "data.mixture: a phase now ends elsewhere, after step 60: the same run goes on" in capsys.readouterr().out

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["world_size"] for m in metrics] == [2] * 60 + [1] * 140
    order = Sources(manifest, load_config(SHAKESPEARE, [f"run_dir={run_dir}", *common,
                                                         MIXTURE.format(until=110)]).data.phases(), seed=1337)
    reader = SampleReader(run_dir / "data", "train")
    expected = [batch_digest([[hashlib.blake2b(b.tobytes(), digest_size=8).digest()
                               for b in reader.read_many(order.order.global_batch(s, BATCH))]]) for s in range(STEPS)]
    reader.close()
    assert [m["data_digest"] for m in metrics] == expected  # the exact samples the schedule defines, at every step

    tokens = np.array([[m["source_tokens"][n] for n in "abc"] for m in metrics])
    per_step = np.diff(np.vstack([[0, 0, 0], tokens]), axis=0)
    assert per_step[:110, 2].sum() == 0 and per_step[110, 2] > 0  # c starts at step 111 exactly
    for rows, weights in ((slice(0, 110), [0.7, 0.3, 0.0]), (slice(110, STEPS), [0.2, 0.3, 0.5])):
        shares = per_step[rows].sum(axis=0) / per_step[rows].sum()
        assert np.abs(shares - weights).max() <= 0.01, shares
    assert set(metrics[-1]["source_epoch"]) == {"a", "b", "c"}
    assert metrics[-1]["source_epoch"]["c"] == int(tokens[-1, 2] // 64 // manifest.sources[2].splits["train"].blocks)
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()  # the loggers get each source's tokens as scalars too
    assert [(e.step, e.value) for e in events.Scalars("source_tokens/c")] == [(m["step"], m["source_tokens"]["c"])
                                                                             for m in metrics]

    cfg = EvalConfig(tasks=[], max_tokens=1500, texts={})
    result = evaluate_checkpoint(str(run_dir / "checkpoint"), cfg, str(run_dir / "data"), str(tmp_path / "eval"),
                                 progress=False)
    assert {"val", "val/a", "val/b", "val/c"} <= set(result["intrinsic"])
    assert all(0 < result["intrinsic"][k]["bits_per_byte"] < 10 for k in ("val/a", "val/b", "val/c"))
