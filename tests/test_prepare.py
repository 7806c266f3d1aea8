"""Prepare at scale: non-UTF-8 rows, dedupe, eval/train overlap, refused prepares, truncation counts,
mixtures (weights, rows) and parallel tokenisation that gives the same bytes as one process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from transformers import PreTrainedTokenizerFast

import core.data.prepare
from core.config import DataConfig
from core.data import DataError, prepare_dataset
from tests.test_data import _make_tokenizer, enc, prep, rows_of, write_jsonl


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _make_tokenizer(adds_bos=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "default-cache"))


def report_of(p) -> dict:
    return json.loads(p.report_path.read_text())


def row(i: int | str) -> dict:
    return {"instruction": f"Say {i}", "output": f"Hi {i}"}


def line_of(r: dict) -> bytes:
    return json.dumps(r).encode()


# ----------------------------------------------------------------------------------------------------
# Non-UTF-8 bytes: that row, not the file
# ----------------------------------------------------------------------------------------------------

BAD = b'{"instruction": "Say caf\xe9", "output": "Hi"}'  # latin-1 e-acute: not UTF-8


def test_a_non_utf8_row_is_rejected_with_its_line_and_the_rest_kept(tmp_path, tok):
    """It used to refuse the whole file with a byte offset ("is not UTF-8 text (... position 27)")."""
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + line_of(row(1)) + b"\r\n" + BAD + b"\r\n" + line_of(row(3)) + b"\r\n")
    p = prep(tmp_path, tok, path=str(f))
    report = report_of(p)
    assert report["rejected"] == {"not_utf8": [2]} and report["rejected_counts"] == {"not_utf8": 1}
    assert [r["source_line"] for r in rows_of(p.train_dir)] == [1, 3]  # BOM and CRLF still fine

    kept = prep(tmp_path, tok, out="replace", path=str(f), decode_errors="replace")
    assert kept.fingerprint != p.fingerprint  # the policy changes the data: it is in the cache key
    report = report_of(kept)
    assert report["rejected"] == {} and report["note_counts"] == {"not_utf8_replaced": 1}
    assert report["notes"]["not_utf8_replaced"] == [2]
    (fixed,) = [r for r in rows_of(kept.train_dir) if r["source_line"] == 2]
    assert "Say caf\ufffd" in fixed["prompt"]


def test_non_utf8_rows_of_csv_and_json_array_files(tmp_path, tok):
    c = tmp_path / "d.csv"
    c.write_bytes(b'instruction,output\nSay hello,Hi\n"multi\nline caf\xe9",Yo\nSay bye,Bye\n')
    p = prep(tmp_path, tok, out="c", path=str(c))
    assert report_of(p)["rejected"] == {"not_utf8": [3]}  # the line the record starts on
    assert [r["source_line"] for r in rows_of(p.train_dir)] == [2, 5]

    j = tmp_path / "d.json"
    j.write_bytes(b"[\n  " + line_of(row(1)) + b",\n  " + BAD + b",\n  " + line_of(row(3)) + b"\n]\n")
    p = prep(tmp_path, tok, out="j", path=str(j))
    assert report_of(p)["rejected"] == {"not_utf8": [3]}
    assert [r["source_line"] for r in rows_of(p.train_dir)] == [2, 4]


def test_a_mostly_non_utf8_file_is_refused_by_the_reject_threshold(tmp_path, tok):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b"\n".join([BAD, BAD, line_of(row(1))]) + b"\n")
    with pytest.raises(
        DataError, match=r"2 of 3 rows were rejected \(not_utf8: 2 row\(s\), e.g. line\(s\) 1, 2"
    ):
        prep(tmp_path, tok, path=str(f))


# ----------------------------------------------------------------------------------------------------
# Duplicates and eval/train overlap
# ----------------------------------------------------------------------------------------------------


def test_duplicates_are_counted_and_dropped_on_request(tmp_path, tok, caplog):
    rows = [row(1), row(2), {"instruction": "Say  1 ", "output": "Hi\n1"}, row(3), row(2)]  # 3 and 5: dups
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="core.data"):
        p = prep(tmp_path, tok, path=str(f))
    report = report_of(p)
    assert (report["duplicate_count"], report["duplicates"], report["duplicates_dropped"]) == (
        2,
        [3, 5],
        False,
    )
    assert p.num_train == 5
    assert any(
        "2 duplicate row(s)" in r.getMessage() and "drop_duplicates" in r.getMessage() for r in caplog.records
    )

    dropped = prep(tmp_path, tok, out="drop", path=str(f), drop_duplicates=True)
    assert dropped.fingerprint != p.fingerprint
    assert [r["source_line"] for r in rows_of(dropped.train_dir)] == [1, 2, 4]
    assert report_of(dropped)["duplicate_count"] == 2


def test_eval_rows_that_occur_in_train_are_counted_and_warned(tmp_path, tok, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(6)])
    evals = write_jsonl(
        tmp_path / "eval.jsonl", [row("held out"), {"instruction": "Say 4", "output": " Hi 4"}]
    )
    with caplog.at_level(logging.WARNING, logger="core.data"):
        p = prep(tmp_path, tok, path=str(train), eval_path=str(evals))
    assert report_of(p)["eval_overlap"] == {"count": 1, "lines": [2]}
    assert any("1 of 2 eval row(s) also occur in the training data" in r.getMessage() for r in caplog.records)


def test_an_eval_set_that_is_the_training_set_is_an_error(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [row(i) for i in range(6)])
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(train.read_bytes())
    with pytest.raises(DataError, match=r"same bytes as data.path.*data.eval_path.*data.eval_fraction"):
        prep(tmp_path, tok, path=str(train), eval_path=str(copy))
    subset = write_jsonl(tmp_path / "subset.jsonl", [row(4), {"instruction": " Say 1", "output": "Hi 1"}])
    with pytest.raises(DataError, match=r"every one of the 2 eval rows.*data.eval_path.*data.eval_fraction"):
        prep(tmp_path, tok, out="subset", path=str(train), eval_path=str(subset))
    assert "every one of the 2 eval rows" in report_of_dir(tmp_path / "subset")["error"]


def report_of_dir(out: Path) -> dict:
    return json.loads((out / "prepare_report.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Refused prepares keep their report; truncation is counted and logged
# ----------------------------------------------------------------------------------------------------


def test_a_failed_prepare_writes_its_report_with_the_error(tmp_path, tok):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a"}, {"instruction": "b"}, "{oops"])
    with pytest.raises(DataError, match="all 3 rows were rejected") as e:
        prep(tmp_path, tok, path=str(f))
    report = report_of_dir(tmp_path / "out")
    assert report["error"] == str(e.value)
    assert report["rejected_counts"] == {"missing_field:output": 2, "malformed_json": 1}
    assert not list((tmp_path / "cache" / "data").iterdir())  # a file with no usable row is never cached
    with pytest.raises(DataError, match="does not exist"):
        prep(tmp_path, tok, out="missing", path=str(tmp_path / "nope.jsonl"))
    assert "does not exist" in report_of_dir(tmp_path / "missing")["error"]


def test_truncated_rows_are_counted_and_logged_with_lost_eos(tmp_path, tok, caplog):
    long = "The quick brown fox jumps over the lazy dog. " * 4
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hello", "output": long}, row(1), row(2)])
    max_len = 1 + len(enc(tok, "### Instruction:\nSay hello\n\n### Response:\n")) + 6
    with caplog.at_level(logging.WARNING, logger="core.data"):
        p = prep(tmp_path, tok, path=str(f), max_seq_len=max_len, truncation="truncate")
    report = report_of(p)
    assert report["note_counts"]["truncated"] == 1 and report["notes"]["truncated"] == [1]
    assert report["note_counts"]["lost_eos"] == 1
    (msg,) = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert (
        "1 row(s) were truncated" in msg and "(1 lost their EOS)" in msg and f"max_seq_len={max_len}" in msg
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.data"):  # logged on a cache hit as well
        prep(tmp_path, tok, out="again", path=str(f), max_seq_len=max_len, truncation="truncate")
    assert any("1 row(s) were truncated" in r.getMessage() for r in caplog.records)


def test_report_lines_are_capped_and_counts_exact(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [row(0)] + [{"instruction": "x"}] * 150)
    report = report_of(prep(tmp_path, tok, path=str(f), max_reject_fraction=1.0))
    assert report["rejected_counts"] == {"missing_field:output": 150}
    assert report["rejected"]["missing_field:output"] == list(range(2, 2 + core.data.prepare.LINES_CAP))


# ----------------------------------------------------------------------------------------------------
# Mixtures
# ----------------------------------------------------------------------------------------------------


def _mixture(tmp_path: Path) -> tuple[Path, Path]:
    a = write_jsonl(tmp_path / "a.jsonl", [row(f"a{i}") for i in range(40)] + [{"instruction": "x"}])
    b = write_jsonl(
        tmp_path / "b.jsonl", [{"prompt": f"b{i} is", "completion": f" b{i}."} for i in range(40)]
    )
    return a, b


def _sources(a: Path, b: Path, **each) -> list[dict]:
    return [
        {"path": str(a), **{k: v[0] for k, v in each.items()}},
        {"path": str(b), "format": "completion", **{k: v[1] for k, v in each.items()}},
    ]


def test_a_weighted_mixture_is_deterministic_by_seed_with_per_source_counts(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # must stay unused
    a, b = _mixture(tmp_path)

    def run(out: str, seed: int, cache: str) -> tuple:
        cfg = DataConfig(
            sources=_sources(a, b, weight=(3.0, 1.0)), eval_fraction=0.0, seed=seed, max_reject_fraction=1
        )
        p = prepare_dataset(cfg, tok, tmp_path / out, cache_dir=tmp_path / cache)
        return p, [(r["prompt"], r["source_line"]) for r in rows_of(p.train_dir)]

    p, rows = run("one", 0, "c1")
    _, again = run("two", 0, "c2")  # rebuilt in another cache
    _, other = run("three", 1, "c1")
    assert rows == again and rows != other
    report = report_of(p)
    a_report, b_report = report["sources"]
    assert (a_report["total"], a_report["kept"], a_report["rejected_counts"]) == (
        41,
        40,
        {"missing_field:output": 1},
    )
    assert (b_report["total"], b_report["kept"], b_report["format"]) == (40, 40, "completion")
    assert a_report["used"] == 40 and 3 <= b_report["used"] <= 25  # stops when a runs out: 3:1, no repeats
    assert a_report["used"] + b_report["used"] == p.num_train == len(rows)
    assert sum(prompt.endswith(" is") for prompt, _ in rows) == b_report["used"]
    assert (report["total"], report["kept"]) == (81, 80)
    assert a_report["weight"] == 3.0 and report["rejected"] == {"missing_field:output": ["0:41"]}
    assert not (tmp_path / "hf").exists()  # intermediates live in the build's temp dir, removed after
    assert sorted(x.name for x in (tmp_path / "c1" / "data").iterdir()) == sorted(
        [p.fingerprint, report_of_dir(tmp_path / "three")["fingerprint"]]
    )
    changed = DataConfig(sources=_sources(a, b, weight=(1.0, 1.0)), eval_fraction=0.0, max_reject_fraction=1)
    assert (
        prepare_dataset(changed, tok, tmp_path / "w", cache_dir=tmp_path / "c1").fingerprint != p.fingerprint
    )


def test_a_mixture_by_rows_takes_a_seeded_sample_and_refuses_too_few(tmp_path, tok):
    a, b = _mixture(tmp_path)
    cfg = DataConfig(sources=_sources(a, b, rows=(5, 3)), eval_fraction=0.25, max_reject_fraction=1)
    p = prepare_dataset(cfg, tok, tmp_path / "out", cache_dir=tmp_path / "cache")
    report = report_of(p)
    assert (p.num_train, p.num_eval) == (6, 2)
    assert sum(s["used"] for s in report["sources"]) == 6  # used counts the training rows
    prompts = [r["prompt"] for r in rows_of(p.train_dir) + rows_of(p.eval_dir)]
    assert sum(x.endswith(" is") for x in prompts) == 3 and len(set(prompts)) == 8
    too_many = DataConfig(sources=_sources(a, b, rows=(5, 41)), max_reject_fraction=1)
    with pytest.raises(
        DataError, match=r"data.sources\[1\] \(.*b.jsonl\) has 40 usable row\(s\), fewer than its rows=41"
    ):
        prepare_dataset(too_many, tok, tmp_path / "many", cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------
# Parallel tokenisation
# ----------------------------------------------------------------------------------------------------


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_two_processes_give_the_same_bytes_as_one(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(core.data.prepare, "BATCH", 64)  # several record batches per raw shard
    monkeypatch.setattr(core.data.prepare, "SHARD_ROWS", 100)  # several shards per process
    f = write_jsonl(tmp_path / "d.jsonl", [row(i) for i in range(300)] + [{"instruction": "x"}, row(7)])
    one = prep(tmp_path, tok, out="one", path=str(f), eval_fraction=0.1, num_proc=1)
    two = prepare_dataset(
        DataConfig(path=str(f), eval_fraction=0.1, num_proc=2),
        tok,
        tmp_path / "two",
        cache_dir=tmp_path / "c2",
    )
    assert report_of(one)["num_proc"] == 1 and report_of(two)["num_proc"] == 2
    assert one.fingerprint == two.fingerprint  # num_proc is not in the key: it changes nothing
    assert _files(one.train_dir) == _files(two.train_dir) and _files(one.eval_dir) == _files(two.eval_dir)
    assert len(_files(one.train_dir)) >= 3  # data, dataset_info.json, state.json
    assert report_of(two)["duplicates"] == [302] and (one.num_train, one.num_eval) == (271, 30)
