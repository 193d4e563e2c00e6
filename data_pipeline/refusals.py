"""What a prepared corpus must hold, checked by `raygpt prepare CONFIG` (`data_pipeline.prepare`): every source keeps
a document after cleaning and after dedup, every weighted source a train block, every split a block. Each failure is
one line naming the source or split and what to change."""

from __future__ import annotations

from typing import Any

from core.layout import SPLITS
from data_pipeline.clean import DROP, SOURCE
from data_pipeline.config import DataConfig, DataError
from data_pipeline.sources import SourceFiles


def check_sources_kept(counts: list[dict[str, Any]], resolved: list[SourceFiles], names: list[str]) -> None:
    """Every source keeps a document after cleaning; one that keeps none is one line with what it lost, by reason
    (a source of unreadable files, of binaries, of documents below data.clean.min_chars)."""
    for r in resolved:
        mine = [c for c in counts if c[SOURCE] == r.index]
        if not any(c["documents"] for c in mine if not c[DROP]):
            read = sum(c["documents"] for c in mine) + len(r.unreadable)
            reasons = ", ".join(f"{c[DROP]}={c['documents']}" for c in sorted(mine, key=lambda c: c[DROP]) if c[DROP])
            reasons += f"{', ' if reasons else ''}unreadable={len(r.unreadable)}" if r.unreadable else ""
            raise DataError(f"data.sources[{r.index}] ({names[r.index]}): nothing left after cleaning: {read} "
                            f"documents read, dropped: {reasons or 'none'}")


def check_written(cfg: DataConfig, written: list[dict[str, Any]], resolved: list[SourceFiles]) -> None:
    """After dedup and packing: every source kept a document, every weighted source a train block, and each split
    holds at least one block — else one line (the caller removes what was written)."""
    names, block = cfg.source_names(), cfg.seq_len + 1
    for r in resolved:
        mine = [w for w in written if w[SOURCE] == r.index]
        if not sum(int(w["documents"]) for w in mine):
            copies = sum(int(w["duplicate"]) + int(w["near_duplicate"]) for w in mine)
            raise DataError(f"data.sources[{r.index}] ({names[r.index]}): every document ({copies:,}) is a duplicate "
                            "of one kept from an earlier source or from itself; remove the source or turn off "
                            "data.clean.dedup / data.clean.minhash")
    weighted = {n for _, weights in (cfg.phases() or []) for n in weights}
    for r in resolved:
        if names[r.index] in weighted and not sum(int(w["sequences"]) for w in written
                                                  if w[SOURCE] == r.index and w["split"] == "train"):
            tokens = sum(int(w["tokens"]) + int(w["tail_tokens"]) for w in written
                         if w[SOURCE] == r.index and w["split"] == "train")
            raise DataError(f"data.sources[{r.index}] ({names[r.index]}) has a mixture weight but its {tokens:,} train "
                            f"tokens make no block of data.seq_len + 1 = {block:,}; add data to it or lower data.seq_len")
    for split in SPLITS:
        if not sum(int(w["sequences"]) for w in written if w["split"] == split):
            tokens = sum(int(w["tokens"]) + int(w["tail_tokens"]) for w in written if w["split"] == split)
            hint = "add data or lower data.seq_len" if split == "train" else \
                "raise data.val_fraction, add data or lower data.seq_len"
            raise DataError(f"the {split} split holds {tokens:,} tokens after dedup, not one block of data.seq_len + 1 "
                            f"= {block:,}; {hint}")
