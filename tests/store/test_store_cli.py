"""`ucm store stats|gc|bench` through the real `ucm` entry point."""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable

import pytest
from store_helpers import LAYOUT, payload_for, random_keys

from ucm.cli import main
from ucm.store import FileStore
from ucm.store.format import HEADER_SIZE, object_path

MakeStore = Callable[..., FileStore]
OBJECT = HEADER_SIZE + LAYOUT.nbytes


def _fill(store: FileStore, n: int) -> list[bytes]:
    keys = random_keys(n)
    for key in keys:
        assert store.dump([key], [payload_for(key)], LAYOUT).wait(10) == [True]
        time.sleep(0.003)
    return keys


def test_stats(make_store: MakeStore, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store()
    keys = _fill(store, 5)
    leaf = os.path.dirname(object_path(os.path.join(store.root, "objects"), keys[0]))
    pathlib.Path(leaf, f".{keys[0].hex()}.h.1.ab.tmp").write_bytes(b"partial")
    assert main(["store", "stats", "--path", store.root, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["blocks"] == 5 and report["bytes"] == 5 * OBJECT
    assert report["temp_files"] == 1 and report["corrupt_in_sample"] == 0
    assert report["salts"] == {store.salt.hex(): 5}
    assert report["layouts"] == {LAYOUT.describe(): 5}
    assert main(["store", "stats", "--path", store.root]) == 0
    text = capsys.readouterr().out
    assert "blocks       5" in text and store.salt.hex() in text and "temp files   1" in text


def test_gc_evicts_lru_and_stale_temps(make_store: MakeStore, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store()
    keys = _fill(store, 6)
    leaf = os.path.dirname(object_path(os.path.join(store.root, "objects"), keys[0]))
    pathlib.Path(leaf, f".{keys[0].hex()}.h.1.ab.tmp").write_bytes(b"partial")
    assert main(["store", "gc", "--path", store.root, "--max-bytes", str(3 * OBJECT), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["evicted_blocks"] == 3 and result["remaining_bytes"] == 3 * OBJECT
    assert result["temps_removed"] == 0  # younger than --temp-age (default one hour)
    assert [os.path.exists(object_path(os.path.join(store.root, "objects"), k)) for k in keys] == [
        False
    ] * 3 + [True] * 3
    store.rescan_interval_s = 0  # the index of a long-running process catches up at its next scan
    store.lookup(keys)
    assert store._refresher is not None
    store._refresher.join(10)
    assert store.lookup(keys) == [False] * 3 + [True] * 3
    assert main(["store", "gc", "--path", store.root, "--temp-age", "0"]) == 0
    assert "removed 1 stale temp files" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["stats", "gc"])
def test_bad_paths_are_clear_errors(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    missing = tmp_path / "nope"
    assert main(["store", command, "--path", str(missing)]) == 2
    assert f"{missing}: no such directory" in capsys.readouterr().err
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["store", command, "--path", str(afile)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["store", command, "--path", str(tmp_path)]) == 2
    assert "not a UCM store" in capsys.readouterr().err


def test_gc_rejects_a_bad_size(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["store", "gc", "--path", str(tmp_path), "--max-bytes", "lots"])
    assert exc.value.code == 2 and "'lots' is not a size" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def small_lookup_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's 8,192-object lookup set costs seconds of file creation on a busy disk; the
    plumbing test uses 512 (the real bench always uses 8,192)."""
    import ucm.store.bench

    monkeypatch.setattr(ucm.store.bench, "LOOKUP_BLOCKS", 512)


def test_bench_json_direct(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    direct = True
    args = ["store", "bench", "--path", str(tmp_path), "--block-mib", "0.25", "--blocks", "8"]
    args += ["--threads", "2", "--rounds", "1", "--json", "--direct"]
    assert main(args) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    for name in (
        "raw_write_gbps",
        "raw_read_gbps",
        "dump_gbps",
        "load_gbps",
        "lookup_ms_8192",
        "hash_mtok_s",
    ):
        assert isinstance(result[name], float) and result[name] > 0, name
    assert result["direct"] is direct and "GB = 1e9 bytes" in result["units"]
    assert "[" not in out.err  # no progress bar in --json mode
    assert os.listdir(tmp_path) == []  # the bench cleans up after itself


def test_bench_table_and_bad_path(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["store", "bench", "--path", str(tmp_path), "--block-mib", "0.25", "--blocks", "4"]
    assert main([*args, "--threads", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr()
    assert "store/raw" in out.out and "lookup of 8192 present blocks" in out.out
    assert "14/14" not in out.err and "6/6" in out.err  # the progress bar
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["store", "bench", "--path", str(afile), "--json"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["store", "bench", "--path", str(tmp_path), "--block-mib", "0.001"]) == 2
    assert "multiple of 4 KiB" in capsys.readouterr().err
