"""`raygpt prepare` end to end on local Ray: the real CLI on tinyshakespeare, exact reconstruction of the token stream
from the shards with plain webdataset, determinism, re-run no-op, crash resume, every source type and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from cluster.cli import main
from core.files import sha256
from data_pipeline.clean import clean_text, doc_hash, split_documents
from data_pipeline.config import CleanConfig
from data_pipeline.pack import is_val, pack_blocks, token_stream
from tests.conftest import REPO

SHAKESPEARE = str(REPO / "configs" / "shakespeare.yaml")
RAYGPT = str(Path(sys.executable).parent / "raygpt")


def _read_blocks(path: Path) -> np.ndarray:
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    return np.stack([s["input_ids.npy"] for s in samples]) if samples else np.empty((0, 0))


def _files(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real console script, in its own process with its own local Ray, on a busy node: CPU hogs hold every core
    while Ray starts and the stage runs (users' machines are busy too; Ray's default health checks were seen to fail
    under such load)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        result = subprocess.run(
            [RAYGPT, "prepare", SHAKESPEARE, f"run_dir={run_dir}", "cluster.num_cpus=2"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[prepare" in result.stdout and "done in" in result.stdout
    return run_dir / "data"


def test_cli_shards_reproduce_the_cleaned_token_stream(cli_run: Path, shared_data: Path) -> None:
    manifest = json.loads((cli_run / "manifest.json").read_text())
    assert (manifest["seq_len"], manifest["block_len"], manifest["dtype"]) == (256, 257, "uint16")
    assert (cli_run.parent / "config.yaml").is_file()
    tokenizer = Tokenizer.from_file(str(cli_run / "tokenizer.json"))
    assert manifest["vocab_size"] == tokenizer.get_vocab_size() == 2048
    eot = manifest["eot_id"]
    assert tokenizer.id_to_token(eot) == "<|endoftext|>"

    # The expected stream, computed here from the raw file with the unit-tested pieces.
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()
    docs = [clean_text(d, CleanConfig())[0] for d in split_documents(text, "paragraph")]
    assert all(docs) and manifest["documents"] == {"read": len(docs), "kept": len(docs)}
    hashes = np.array([doc_hash(d) for d in docs], dtype=np.int64)
    ids = [np.array(e.ids, dtype=np.uint16) for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
    val = is_val(hashes, 0.1)
    assert manifest["splits"]["val"]["documents"] == int(val.sum())

    for split, in_split in (("train", ~val), ("val", val)):
        entry = manifest["splits"][split]
        members = np.flatnonzero(in_split)  # one unit (the file is under 4 MB): its documents in the file's order
        expected, tail = pack_blocks(token_stream([ids[i] for i in members], eot, np.dtype(np.uint16)), 257)
        assert [s["file"] for s in entry["shards"]] == [f"{split}/shard-000000-0000.tar"]
        total_blocks = 0
        for listed in entry["shards"]:
            blocks = _read_blocks(cli_run / listed["file"])
            assert blocks.dtype == np.uint16
            assert (blocks == expected[total_blocks:total_blocks + len(blocks)]).all()  # same tokens, same order
            assert listed["sha256"] == sha256(cli_run / listed["file"])
            assert listed["bytes"] == (cli_run / listed["file"]).stat().st_size
            assert listed["sequences"] == len(blocks) and listed["tokens"] == blocks.size
            total_blocks += len(blocks)
        assert total_blocks == len(expected) and entry["tail_tokens"] == tail
        # No loss, no duplication: every document token and one EOT per document is in a block or the counted tail.
        assert entry["sequences"] == total_blocks
        assert entry["doc_tokens"] == sum(len(ids[i]) for i in members)
        assert entry["tokens"] + entry["tail_tokens"] == entry["doc_tokens"] + entry["documents"]
        assert entry["text_bytes"] == sum(len(docs[i].encode()) for i in members)


def test_determinism_noop_and_crash_resume(cli_run: Path, tmp_path: Path, ray_session: None, capsys) -> None:
    run_dir = tmp_path / "run"
    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}"]) == 0
    data = run_dir / "data"
    assert _files(data) == _files(cli_run)  # another process, another Ray: identical bytes

    # A finished run_dir with the same config is a no-op.
    stamps = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == stamps

    # Another config on the same run_dir: refused, nothing touched (not even config.yaml); with overwrite it is redone.
    config_yaml = (run_dir / "config.yaml").read_bytes()
    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}", "data.seq_len=128"]) == 2
    assert "already holds data prepared from another config or corpus" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == stamps
    assert (run_dir / "config.yaml").read_bytes() == config_yaml

    # A crash mid-run: no manifest, a truncated shard, temp files and a stale shard. The re-run completes identically.
    original = _files(data)
    (data / "manifest.json").unlink()
    shard = data / "train" / "shard-000000-0000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    (data / "train" / ".shard-000000-0000.tar.1a2b3c.tmp").write_bytes(b"partial")
    (data / "train" / "shard-000042-0000.tar").write_bytes(b"stale")
    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}"]) == 0
    assert _files(data) == original

    assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}", "data.seq_len=128", "data.overwrite=true"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["seq_len"] == 128 and _read_blocks(data / "train" / "shard-000000-0000.tar").shape[1] == 129


def _mixed_corpus(root: Path) -> dict[str, str]:
    """Text files (with a binary, bad UTF-8, a copy, a too-short file and a near copy), JSONL, Parquet and a saved HF
    dataset; returns what each source should contribute."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    long_doc = " ".join(f"alpha{i} beta{i % 7}" for i in range(400))
    texts = root / "texts"
    texts.mkdir(parents=True)
    (texts / "a.txt").write_bytes(b"The first document.\r\nIt has two lines.\r\n")  # CRLF → LF when cleaned
    (texts / "b.md").write_bytes(b"The first document.\nIt has two\x07 lines.\n")  # once cleaned, a copy of a.txt
    (texts / "c.txt").write_bytes(b"caf\xe9 au lait, in Latin-1\n")  # invalid UTF-8 → replaced
    (texts / "d.txt").write_bytes(b"\x00\x01\x02 binary")  # binary → dropped
    (texts / "e.txt").write_text("x")  # too short
    (texts / "f.py").write_text(long_doc)
    (texts / "g.txt").write_text(long_doc.replace("alpha200 ", "omega "))  # near duplicate of f.py
    (texts / "ignored.csv").write_text("not, a, listed, extension")
    rows = [{"body": f"json record number {i} with some words"} for i in range(20)] + [{"other": "no body"}]
    rows.append({"body": "The first document.\nIt has two lines.\n"})  # a copy of a.txt in another source
    (root / "records.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.table({"content": [f"parquet row {i} says hello" for i in range(15)]}), root / "t.parquet")
    datasets.Dataset.from_dict({"text": [f"hf example {i} of a saved dataset" for i in range(12)]}).save_to_disk(
        str(root / "hf")
    )
    (root / "hub").mkdir()  # a dataset folder as on the hub (data files, no saved state): streamed, a unit per file
    for part in range(2):
        pq.write_table(pa.table({"text": [f"streamed row {part}.{i} from the hub" for i in range(5)],
                                 "url": [f"https://example.com/{part}/{i}" for i in range(5)]}), root / "hub" / f"{part}.parquet")
    return {"long_doc": long_doc}


def test_every_source_type_cleaning_and_dedup(tmp_path: Path, ray_session: None) -> None:
    corpus = _mixed_corpus(tmp_path / "corpus")
    config = tmp_path / "mixed.yaml"
    config.write_text(
        f"""
name: mixed
run_dir: {tmp_path / "run"}
data:
  sources:
    - path: {tmp_path / "corpus" / "texts"}
    - path: {tmp_path / "corpus" / "records.jsonl"}
      text_field: body
    - path: {tmp_path / "corpus" / "*.parquet"}
      text_field: content
    - path: {tmp_path / "corpus" / "hf"}
      type: hf
    - path: {tmp_path / "corpus" / "hub"}
      type: hf
  clean:
    min_chars: 5
    minhash: {{enabled: true}}
  tokenizer: {{vocab_size: 300, min_frequency: 1}}
  seq_len: 16
  val_fraction: 0.2
"""
    )
    assert main(["prepare", str(config)]) == 0
    data = tmp_path / "run" / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    assert [(s["name"], s["type"], s["files"], s["documents"]) for s in manifest["sources"]] == [
        ("texts", "text", 7, 7),
        ("records", "jsonl", 1, 22),
        ("corpus", "parquet", 1, 15),
        ("hf", "hf", 0, 12),
        ("hub", "hf", 0, 10),
    ]
    dropped = {k: v["documents"] for k, v in manifest["dropped"].items()}
    assert dropped == {"binary": 1, "duplicate": 2, "near_duplicate": 1, "no_text": 1, "too_short": 1}
    assert manifest["utf8_replaced_documents"] == 1
    assert manifest["documents"]["kept"] == 66 - 6
    for split, totals in manifest["splits"].items():  # each source's part of a split adds up to the split
        for total, key in (("blocks", "sequences"), ("documents", "documents"), ("text_bytes", "text_bytes")):
            assert sum(s["splits"][split][total] for s in manifest["sources"]) == totals[key]
    assert manifest["splits"]["val"]["documents"] > 0

    # Decode every shard back to text: each shard starts at a document, so every piece before its last EOT is a
    # whole document; each must be one we expect to keep, and none may appear twice.
    long_doc = corpus["long_doc"]
    expected = {"The first document.\nIt has two lines.\n", "caf\ufffd au lait, in Latin-1\n"}
    expected |= {f"json record number {i} with some words" for i in range(20)}
    expected |= {f"parquet row {i} says hello" for i in range(15)}
    expected |= {f"hf example {i} of a saved dataset" for i in range(12)}
    expected |= {f"streamed row {part}.{i} from the hub" for part in range(2) for i in range(5)}
    near_pair = {long_doc, long_doc.replace("alpha200 ", "omega ")}
    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    decoded: list[str] = []
    by_source: dict[str, set[str]] = {}
    for split in manifest["splits"].values():
        sources = [shard["source"] for shard in split["shards"]]
        assert sources == sorted(sources, key=["texts", "records", "corpus", "hf", "hub"].index)  # one range per source
        for shard in split["shards"]:
            stream = _read_blocks(data / shard["file"]).reshape(-1)
            ends = np.flatnonzero(stream == manifest["eot_id"])
            starts = np.concatenate([[0], ends[:-1] + 1])
            docs = [tokenizer.decode(stream[a:b].tolist()) for a, b in zip(starts, ends)]
            decoded += docs
            by_source.setdefault(shard["source"], set()).update(docs)
    # a block never mixes sources; the copy in two sources is kept once, in the first source's blocks
    assert all(d.startswith("json record") for d in by_source.get("records", set()))
    assert all(d.startswith("parquet row") for d in by_source.get("corpus", set()))
    assert all(d.startswith("hf example") for d in by_source.get("hf", set()))
    assert all(d.startswith("streamed row") for d in by_source.get("hub", set()))
    assert len(decoded) == len(set(decoded)) >= 40  # tails (< 17 tokens per shard) may cut a few documents
    assert set(decoded) <= expected | near_pair
    assert len(set(decoded) & near_pair) <= 1
    # Bits per byte divide by the bytes of the cleaned text that was tokenized, not by what was read.
    kept = expected | {min(near_pair, key=doc_hash)}
    assert manifest["bytes"]["kept"] == sum(len(d.encode()) for d in kept)
    assert manifest["bytes"]["read"] > manifest["bytes"]["kept"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("path: /no/such/file.txt", r"data\.sources\[0\]: no such file or directory: /no/such/file\.txt"),
        ("path: /no/such/*.txt", r"data\.sources\[0\]: glob matched no files"),
        ("path: {tmp}/data.xyz", r"cannot infer the type of source .*data\.xyz.*; set its type"),
        ("path: {tmp}/r.jsonl\n      text_field: body", r"r\.jsonl: no text field 'body' \(fields: text\)"),
        ("path: {tmp}/bad.jsonl", r"bad\.jsonl: the first line is not a JSON object"),
        ("path: {tmp}/r.jsonl\n      type: parquet", r"r\.jsonl: not a readable Parquet file"),
        ("path: {tmp}/empty_dir", r"directory holds no files of the source's extensions"),
    ],
)
def test_bad_sources_fail_before_any_work(tmp_path: Path, capsys, source: str, message: str) -> None:
    (tmp_path / "data.xyz").write_text("?")
    (tmp_path / "r.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "empty_dir").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(f"name: bad\nrun_dir: {tmp_path / 'run'}\ndata:\n  sources:\n    - {source.format(tmp=tmp_path)}\n")
    assert main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("raygpt: error: ")

    assert re.search(message, err), err
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()


def test_a_changed_corpus_is_new_data_and_links_out_of_a_source_are_not_followed(
    tmp_path: Path, ray_session: None, capsys
) -> None:
    """Prepare's fingerprint covers each source file's size and mtime: editing the corpus under a prepared run_dir
    is refused like a changed config. A directory source does not read through a symlink that leaves it unless the
    source says follow_symlinks."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    for i in range(30):
        (corpus / f"doc{i}.txt").write_text(f"document number {i} " * 40)
    (elsewhere / "secret.txt").write_text("a file outside the corpus folder " * 40)
    (corpus / "link.txt").symlink_to(elsewhere / "secret.txt")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: c\nrun_dir: {tmp_path / 'run'}\ndata:\n  seq_len: 32\n  val_fraction: 0.2\n  sources:\n"
                      f"    - path: {corpus}\n  tokenizer:\n    vocab_size: 300\n")
    assert main(["prepare", str(config)]) == 0
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["sources"][0]["files"] == 30  # the link out of the folder was not read

    assert main(["prepare", str(config)]) == 0 and "already prepared" in capsys.readouterr().out
    with open(corpus / "doc3.txt", "a") as f:
        f.write("an edit")
    assert main(["prepare", str(config)]) == 2
    assert "already holds data prepared from another config or corpus" in capsys.readouterr().err
    assert main(["prepare", str(config), "data.overwrite=true", "data.sources=[{path: " + str(corpus) +
                 ", follow_symlinks: true}]"]) == 0
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["sources"][0]["files"] == 31


def test_nothing_left_after_filtering(tmp_path: Path, ray_session: None, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("tiny")
    (corpus / "b.txt").write_bytes(b"\x00binary")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: e\nrun_dir: {tmp_path / 'run'}\ndata:\n  sources:\n    - path: {corpus}\n")
    assert main(["prepare", str(config), "data.clean.min_chars=100"]) == 2
    err = capsys.readouterr().err
    assert "nothing left after filtering: 2 documents read, dropped: binary=1, too_short=1" in err
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()


def test_cli_bad_config_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [RAYGPT, "prepare", SHAKESPEARE, "data.seq_len=zero"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"raygpt: error: {SHAKESPEARE}: data.seq_len: Input should be a valid integer, unable to parse string as an "
        "integer (got 'zero')"
    ]


def test_too_little_data_loops_and_a_small_vocabulary_are_refused(tmp_path: Path, ray_session: None, capsys) -> None:
    """The audit's prepare probes: a corpus that packs into no block of seq_len + 1 tokens says so instead of "done"
    with no shards; a folder whose links loop (with follow_symlinks) is walked once instead of forever; a byte-level
    BPE vocabulary below the 256 bytes is refused instead of silently becoming 257."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(3):
        (corpus / "sub" / f"doc{i}.txt").write_text(f"document {i} " * 30)
    (corpus / "sub" / "up").symlink_to(corpus)  # two links that loop
    (corpus / "again").symlink_to(corpus / "sub")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: small\nrun_dir: {tmp_path / 'run'}\ndata:\n  seq_len: 100000\n  sources:\n"
                      f"    - {{path: {corpus}, follow_symlinks: true}}\n  tokenizer:\n    vocab_size: 300\n")
    assert main(["prepare", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"the train split holds [\d,]+ tokens after dedup, not one block of "
                                              r"data.seq_len \+ 1 = 100,001", err), err
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()
    assert main(["prepare", str(config), "data.tokenizer.vocab_size=64"]) == 2
    assert "vocab_size 64 is below byte-level BPE's 259" in capsys.readouterr().err


def test_a_source_that_yields_nothing_is_one_line_and_nothing_is_written(
    tmp_path: Path, ray_session: None, shared_data: Path, capsys
) -> None:
    """A source empty after cleaning, a source whose every document is a copy of another source's, a mixture weight on
    a source too small for one block, and a corpus too small for one val block: each stops with one line, and the data
    dir holds no manifest, shard or block index afterwards."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:100_000]
    (tmp_path / "main.txt").write_text(text)
    (tmp_path / "short.txt").write_text("a\n\nb\n\nc")  # 3 paragraphs, each below min_chars
    (tmp_path / "copy.txt").write_text(text[: text.index("\n\n", 20_000)])  # every paragraph a copy of one of main's
    (tmp_path / "tiny.txt").write_text("A line of its own.")
    main_src = f"{{path: {tmp_path / 'main.txt'}, split_by: paragraph}}"
    cases = {
        "empty": ([f"data.sources=[{main_src}, {{path: {tmp_path / 'short.txt'}, split_by: paragraph}}]"],
                  "data.sources[1] (short): nothing left after cleaning: 3 documents read, dropped: too_short=3"),
        "copies": ([f"data.sources=[{main_src}, {{path: {tmp_path / 'copy.txt'}, split_by: paragraph}}]",
                    "data.clean.dedup=true"],
                   "data.sources[1] (copy): every document ("),
        "weighted": ([f"data.sources=[{main_src}, {{path: {tmp_path / 'tiny.txt'}}}]",
                      "data.mixture=[{weights: {main: 0.9, tiny: 0.1}}]"],
                     "data.sources[1] (tiny) has a mixture weight but its "),
        "no-val": ([f"data.sources=[{main_src}]", "data.val_fraction=1e-9"], "the val split holds 0 tokens after dedup"),
    }
    for name, (overrides, message) in cases.items():
        run_dir = tmp_path / name
        assert main(["prepare", SHAKESPEARE, f"run_dir={run_dir}", "data.tokenizer.vocab_size=300", "data.seq_len=64",
                     "data.clean.min_chars=5", *overrides]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (name, err)
        data = run_dir / "data"
        assert not (data / "manifest.json").exists() and not list(data.glob("*/*.tar")) and not list(data.glob("*/*.idx"))


def test_compressed_jsonl_is_read_as_a_stream(tmp_path: Path, ray_session: None, capsys) -> None:
    """`.jsonl.gz` and `.jsonl.zst` sources: typed from the extension, their first record checked through the codec,
    read by Ray Data's JSON reader decompressing on the way; a missing text field names the fields there are; a
    truncated or corrupt file is one line naming it, and nothing is prepared."""
    import pyarrow as pa

    for name, codec in (("a.jsonl.gz", "gzip"), ("b.jsonl.zst", "zstd")):
        rows = [{"body": f"{name} record number {i}, with a few more words"} for i in range(40)]
        with pa.output_stream(str(tmp_path / name), compression=codec) as out:
            out.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    sources = (f"data.sources=[{{path: {tmp_path / 'a.jsonl.gz'}, text_field: body}}, "
               f"{{path: {tmp_path / 'b.jsonl.zst'}, text_field: body}}]")
    common = ["data.tokenizer.vocab_size=300", "data.seq_len=16", "data.val_fraction=0.2", sources]
    assert main(["prepare", SHAKESPEARE, f"run_dir={tmp_path / 'run'}", *common]) == 0
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert [(s["name"], s["type"], s["documents"]) for s in manifest["sources"]] == [("a", "jsonl", 40), ("b", "jsonl", 40)]
    assert manifest["documents"]["kept"] == 80
    assert main(["prepare", SHAKESPEARE, f"run_dir={tmp_path / 'other'}", *common[:3],
                 f"data.sources=[{{path: {tmp_path / 'b.jsonl.zst'}, text_field: text}}]"]) == 2
    assert "b.jsonl.zst: no text field 'text' (fields: body)" in capsys.readouterr().err
    many = "".join(json.dumps({"body": f"line {i} of a long file"}) + "\n" for i in range(50_000)).encode()
    with pa.output_stream(str(tmp_path / "whole.gz"), compression="gzip") as out:
        out.write(many)
    whole = (tmp_path / "whole.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a download that stopped halfway
    (tmp_path / "bad.jsonl").write_text('{"body": "fine"}\n' * 10 + '{"body": "no end\n')
    (tmp_path / "short-cut.jsonl.gz").write_bytes((tmp_path / "a.jsonl.gz").read_bytes()[:100])
    for name, expected in (("cut.jsonl.gz", "corrupt or truncated at line "),
                           ("bad.jsonl", "line 11 (byte 170): not a JSON object"),
                           ("short-cut.jsonl.gz", "cannot read the first line (")):  # the driver's first look
        assert main(["prepare", SHAKESPEARE, f"run_dir={tmp_path / (name + '.run')}", *common[:3],
                     f"data.sources=[{{path: {tmp_path / name}, text_field: body}}]"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / name}: {expected}" in err, err
        assert not (tmp_path / (name + ".run") / "data" / "manifest.json").exists()


def test_a_prepare_stopped_mid_way_resumes_to_the_same_bytes(tmp_path: Path, ray_session: None, shared_data: Path,
                                                            capsys) -> None:
    """tinyshakespeare's paragraphs as one JSONL file cut into ~30 byte ranges (units). A record that is not JSON
    near the end stops the run with its line and byte; put back as it was (same size and mtime: the same corpus), the
    re-run resumes every unit surveyed before the stop and ends with the bytes of a run that never stopped — with
    the stop's temp files, a truncated shard and another config's stale shard cleared away."""
    paragraphs = split_documents((shared_data / "tinyshakespeare" / "input.txt").read_text(), "paragraph")
    lines = [json.dumps({"text": p}) for p in paragraphs]
    corpus = tmp_path / "plays.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    overrides = ["data.tokenizer.vocab_size=512", "data.seq_len=64", "data.unit_bytes=50000", "data.shard_bytes=40000",
                 "data.clean.minhash.enabled=true", f"data.sources=[{{path: {corpus}}}]"]
    assert main(["prepare", SHAKESPEARE, f"run_dir={tmp_path / 'whole'}", *overrides]) == 0
    clean = _files(tmp_path / "whole" / "data")
    manifest = json.loads(clean["manifest.json"])
    assert len({s["file"].split("-")[1] for s in manifest["splits"]["train"]["shards"]}) > 20  # units
    assert any(s["file"].endswith("-0001.tar") for s in manifest["splits"]["train"]["shards"])  # a unit's 2nd tar
    capsys.readouterr()

    original, stamp = corpus.read_bytes(), corpus.stat().st_mtime_ns
    bad = len("\n".join(lines[:-3])) + 1  # the byte where the 3rd-last record starts
    corpus.write_bytes(original[:bad] + b"[" + original[bad + 1:])  # '["text": ...': same size
    os.utime(corpus, ns=(stamp, stamp))
    run = tmp_path / "stopped"
    assert main(["prepare", SHAKESPEARE, f"run_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{corpus}: byte {bad:,}: not a JSON object" in err, err
    surveyed = len(list((run / "data" / "_work" / "survey").glob("unit-*.json")))
    units = len(json.loads((run / "data" / "_work" / "plan.json").read_text())["units"])
    assert 0 < surveyed < units and not (run / "data" / "manifest.json").exists()

    corpus.write_bytes(original)
    os.utime(corpus, ns=(stamp, stamp))
    (run / "data" / "train").mkdir(parents=True, exist_ok=True)
    (run / "data" / "train" / ".shard-000003-0000.tar.1a2b3c.tmp").write_bytes(b"partial")
    (run / "data" / "train" / "shard-000002-0000.tar").write_bytes(b"truncated")
    (run / "data" / "train" / "shard-000999-0000.tar").write_bytes(b"stale")
    assert main(["prepare", SHAKESPEARE, f"run_dir={run}", *overrides]) == 0
    resumed = re.search(r"surveyed units: (\d+) of (\d+) already done \(resumed\)", capsys.readouterr().out)
    assert resumed and surveyed <= int(resumed[1]) < int(resumed[2]) == units
    assert _files(run / "data") == clean  # and DATA/_work is gone
