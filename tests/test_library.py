"""``deltatune library``: the SQLite index of delta folders (CRUD, search, concurrency, health, serving)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sqlite3
import threading

import pytest
import torch
from serve_helpers import save_random_deltas

import deltatune as dt
from deltatune.cli import main
from deltatune.errors import DeltaFileError, LibraryError
from deltatune.library import CHANGED, CORRUPT, MISSING, OK, Library, Query
from deltatune.serve import DeltaLibrary, Work, engine_from_options, load_base

CONFIGS = {"sentiment": dt.LoRAConfig(r=4, modules_to_save=["classifier"]),
           "spam": dt.IA3Config(modules_to_save=["classifier"])}


@pytest.fixture(scope="module")
def folders(tiny_bert, tmp_path_factory):
    """Two deltas of one base, one of another base, each with a run's metrics.json."""
    root = tmp_path_factory.mktemp("deltas")
    model, _, _ = load_base(str(tiny_bert), DeltaLibrary(root))
    save_random_deltas(model, root, CONFIGS)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.add_(0.5)
    save_random_deltas(model, root, {"otherbase": dt.LoRAConfig(r=4, modules_to_save=["classifier"])})
    for name, accuracy in (("sentiment", 0.9), ("spam", 0.7), ("otherbase", 0.85)):
        (root / name / "metrics.json").write_text(json.dumps({"test": {"accuracy": accuracy, "loss": 0.3},
                                                              "validation": {"accuracy": 0.1}}))
    return root


@pytest.fixture
def copies(folders, tmp_path):
    """A private copy of the delta folders (tests that damage them)."""
    shutil.copytree(folders, tmp_path / "deltas")
    return tmp_path / "deltas"


@pytest.fixture
def library(folders, tmp_path):
    library = Library(tmp_path / "lib.db")
    library.add(folders / "sentiment", tags=["english", "reviews"], note="Movie reviews, two labels")
    library.add(folders / "spam", tags=["english"], note="SMS spam filter")
    library.add(folders / "otherbase", note="trained on a changed base")
    return library


def names(records) -> list[str]:
    return [r.name for r in records]


def test_add_records_what_the_folder_says(library, folders):
    record = library.get("sentiment")
    meta = dt.read_meta(folders / "sentiment")
    assert (record.method, record.task, record.labels) == ("lora", "classification", ["negative", "positive"])
    assert record.fingerprint == meta["base"]["sha256"] and record.model_class == "BertForSequenceClassification"
    assert record.metrics["test.accuracy"] == 0.9 and record.metrics["validation.accuracy"] == 0.1
    assert record.files["delta.safetensors"].sha256 == meta["tensors_sha256"]
    assert (record.tags, record.note, record.status) == (["english", "reviews"], "Movie reviews, two labels", OK)


def test_search_filters_each_narrow_the_result(library, folders):
    fingerprint = dt.read_meta(folders / "sentiment")["base"]["sha256"]
    assert names(library.search(Query(method="lora"))) == ["otherbase", "sentiment"]
    assert names(library.search(Query(fingerprint=fingerprint[:10]))) == ["sentiment"]
    assert names(library.search(Query(base="bert", method="ia3"))) == ["spam"]
    assert names(library.search(Query(task="classification", tags=("english",)))) == ["sentiment", "spam"]
    assert names(library.search(Query(tags=("english", "reviews")))) == ["sentiment"]
    assert names(library.search(Query(labels=("positive",)))) == ["sentiment"]
    # a bare metric name means test.<name> here, not validation.<name> (0.1 everywhere)
    assert names(library.search(Query(metrics=("accuracy>=0.8",)))) == ["otherbase", "sentiment"]
    assert names(library.search(Query(metrics=("accuracy<0.8",)))) == ["spam"]
    assert names(library.search(Query(metrics=("validation.accuracy>0.5",)))) == []
    assert names(library.search(Query(metrics=("accuracy>=0.8", "test.loss<=0.3"), method="lora"))) == \
        ["otherbase", "sentiment"]
    assert names(library.search(Query(text="movie"))) == ["sentiment"]
    assert names(library.search(Query(text="SPAM filter"))) == ["spam"]
    assert names(library.search(Query(text="100%"))) == []  # LIKE wildcards are literal


@pytest.mark.parametrize("bad", ["accuracy", "accuracy>>1", "accuracy>=high", "acc uracy>1", "accuracy>=inf"])
def test_a_malformed_metric_filter_names_the_form(library, bad):
    with pytest.raises(LibraryError, match="NAME OP NUMBER|finite"):
        library.search(Query(metrics=(bad,)))


def test_a_taken_name_is_refused_unless_replaced(library, folders):
    with pytest.raises(LibraryError, match="already has a delta named 'spam'.*--replace"):
        library.add(folders / "spam")
    library.add(folders / "sentiment", name="spam", replace=True, tags=["new"])
    assert library.get("spam").method == "lora" and library.get("spam").tags == ["new"]
    assert len(library) == 3


def test_remove_takes_the_entry_out_and_leaves_the_folder(library, folders):
    library.remove("spam")
    assert names(library.list()) == ["otherbase", "sentiment"]
    assert (folders / "spam" / "delta.json").is_file()
    with pytest.raises(LibraryError, match="no delta named 'spam'.*otherbase, sentiment"):
        library.remove("spam")
    with pytest.raises(LibraryError, match="no delta named 'nope'"):
        library.get("nope")


def test_adding_a_folder_without_a_sound_delta_writes_nothing(library, copies, tmp_path):
    with pytest.raises(DeltaFileError, match="does not exist"):
        library.add(tmp_path / "absent")
    data = bytearray((copies / "spam" / "delta.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copies / "spam" / "delta.safetensors").write_bytes(bytes(data))
    with pytest.raises(DeltaFileError, match="checksum"):
        library.add(copies / "spam", name="broken")
    with pytest.raises(LibraryError, match="invalid delta name"):
        library.add(copies / "sentiment", name="no spaces")
    assert names(library.list()) == ["otherbase", "sentiment", "spam"]


def test_deleted_corrupt_and_resaved_folders_show_in_list_and_verify(copies, tmp_path, tiny_bert):
    library = Library(tmp_path / "lib.db")
    for name in ("sentiment", "spam", "otherbase"):
        library.add(copies / name)
    shutil.rmtree(copies / "spam")
    tensors = copies / "sentiment" / "delta.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF  # same size; the modification time changes
    tensors.write_bytes(bytes(data))
    listed = {r.name: r for r in library.list()}
    assert {n: r.status for n, r in listed.items()} == {"otherbase": OK, "sentiment": CORRUPT, "spam": MISSING}
    assert "checksum" in listed["sentiment"].problem and "does not exist" in listed["spam"].problem
    # a sound delta saved again over the folder: changed, not corrupt
    model, _, _ = load_base(str(tiny_bert), DeltaLibrary(copies))
    save_random_deltas(model, copies, {"other2": dt.LoRAConfig(r=4, modules_to_save=["classifier"])}, seed=3)
    shutil.rmtree(copies / "otherbase")
    shutil.copytree(copies / "other2", copies / "otherbase")
    verified = {r.name: r.status for r in library.verify()}
    assert verified == {"otherbase": CHANGED, "sentiment": CORRUPT, "spam": MISSING}


def test_verify_finds_a_change_that_kept_size_and_time(copies, tmp_path):
    import os

    library = Library(tmp_path / "lib.db")
    library.add(copies / "spam")
    tensors = copies / "spam" / "delta.safetensors"
    stat = tensors.stat()
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    os.utime(tensors, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert library.list()[0].status == OK  # the cheap look trusts size and time
    assert library.verify()[0].status == CORRUPT


def _add_many(db: str, folder: str, prefix: str, count: int) -> None:
    library = Library(db)
    for i in range(count):
        library.add(folder, name=f"{prefix}{i}", tags=[prefix, f"n{i}"], note=f"writer {prefix}")


def test_concurrent_writers_from_processes_and_threads_all_land(folders, tmp_path):
    db = str(tmp_path / "lib.db")
    Library(db)
    context = multiprocessing.get_context("fork")  # processes started before the threads
    processes = [context.Process(target=_add_many, args=(db, str(folders / "spam"), f"p{k}x", 6)) for k in range(3)]
    threads = [threading.Thread(target=_add_many, args=(db, str(folders / "sentiment"), f"t{k}x", 6)) for k in range(3)]
    for worker in (*processes, *threads):
        worker.start()
    for worker in (*processes, *threads):
        worker.join(120)
    assert all(p.exitcode == 0 for p in processes)
    records = Library(db).list()
    assert len(records) == 36 and all(r.status == OK for r in records)
    assert all(r.tags == sorted([r.name[:3], "n" + r.name[3:]]) for r in records)
    assert names(Library(db).search(Query(tags=("p1x",)))) == [f"p1x{i}" for i in range(6)]


def test_a_newer_schema_and_a_file_that_is_no_database_are_refused(tmp_path):
    db = tmp_path / "lib.db"
    Library(db)
    with sqlite3.connect(db) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(LibraryError, match="schema version 99.*upgrade deltatune"):
        Library(db)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LibraryError, match="not a deltatune library"):
        Library(junk)


def test_centroids_are_float32_blobs_round_tripped(library):
    vector = torch.tensor([0.25, -1.5, 3.0])
    library.set_centroid("spam", vector, examples=7)
    assert torch.equal(library.centroids(["spam", "sentiment"])["spam"], vector)
    assert library.get("spam").centroid_dims == 3
    with pytest.raises(LibraryError, match="finite"):
        library.set_centroid("spam", torch.tensor([float("nan")]), examples=1)


def test_cli_add_list_search_show_rm_verify(folders, tmp_path, capsys):
    db = str(tmp_path / "cli.db")
    assert main(["library", "--db", db, "add", str(folders / "sentiment"), "--tag", "english", "--note", "reviews"]) == 0
    assert main(["library", "--db", db, "add", str(folders / "spam")]) == 0
    capsys.readouterr()
    assert main(["library", "--db", db, "search", "--metric", "accuracy>=0.8", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["sentiment"]
    assert main(["library", "--db", db, "show", "spam"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "ia3"
    assert main(["library", "--db", db, "list"]) == 0
    assert "sentiment  ok" in capsys.readouterr().out
    assert main(["library", "--db", db, "verify"]) == 0
    assert main(["library", "--db", db, "rm", "spam"]) == 0
    assert main(["library", "--db", db, "show", "spam"]) == 2
    assert "no delta named 'spam'" in capsys.readouterr().err
    assert main(["library", "--db", db, "add", str(folders / "sentiment")]) == 2  # taken


def test_server_takes_its_deltas_from_a_library(library, folders, copies, tiny_bert):
    engine = engine_from_options(str(tiny_bert), library=library.db)
    assert engine.library.available() == ["otherbase", "sentiment", "spam"]
    [got] = engine.classify([Work("sentiment", ["good movie"])])
    model, tokenizer, _ = load_base(str(tiny_bert), DeltaLibrary(folders))
    dt.load(model, folders / "sentiment")
    with torch.no_grad():
        expected = torch.softmax(model(**tokenizer(["good movie"], return_tensors="pt")).logits, -1)[0]
    assert list(got[0]["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-5)
    assert got[0]["label"] in ("negative", "positive")
    # another base: 409; a folder that went missing: 404 naming it; the server goes on
    other, = engine.classify([Work("otherbase", ["good movie"])])
    assert other.status == 409
    library.add(copies / "spam", name="gone")
    shutil.rmtree(copies / "spam")
    gone, still = engine.classify([Work("gone", ["x"]), Work("spam", ["good movie"])])
    assert gone.status == 404 and "missing" in gone.message and isinstance(still, list)
    assert "gone" not in engine.library.available()


def test_serve_needs_exactly_one_source(tiny_bert, tmp_path):
    with pytest.raises(dt.ConfigError, match="--deltas DIR.*--library DB"):
        engine_from_options(str(tiny_bert))
    with pytest.raises(DeltaFileError, match="does not exist"):
        engine_from_options(str(tiny_bert), library=tmp_path / "none.db")


def test_server_model_auto_takes_the_delta_with_the_nearest_centroid(library, folders, tiny_bert):
    import httpx

    from deltatune.library import embed
    from deltatune.serve import Settings, create_app
    from deltatune.serve.background import running

    engine = engine_from_options(str(tiny_bert), library=library.db)
    texts = ["good movie", "the plot was very dull"]
    with torch.no_grad():
        anchors = embed(engine.model, engine.tokenizer(texts, padding=True, return_tensors="pt"))
    library.set_centroid("sentiment", anchors[0], 1)
    library.set_centroid("spam", anchors[1], 1)
    library.set_centroid("otherbase", anchors[0], 1)  # nearest too, but made for another base: never chosen
    auto = Work("auto", [texts[1]])
    [got] = engine.classify([auto])
    [named] = engine.classify([Work("spam", [texts[1]])])
    assert auto.delta == "spam" and got == [{**row, "delta": "spam"} for row in named]
    with running(create_app(engine, Settings(max_wait_ms=5))) as url:
        answer = httpx.post(f"{url}/v1/classify", json={"delta": "auto", "inputs": [texts[0]]}, timeout=30).json()
        mixed = httpx.post(f"{url}/v1/classify", json={"delta": "auto", "inputs": [texts[1], texts[0], texts[1]]},
                           timeout=30).json()
    assert answer["delta"] == "sentiment" and answer["results"][0]["delta"] == "sentiment"
    # each text of one request is routed on its own, and answered as its delta answers it alone
    assert mixed["delta"] == "auto" and [r["delta"] for r in mixed["results"]] == ["spam", "sentiment", "spam"]
    [alone] = engine.classify([Work("sentiment", [texts[0]])])
    assert mixed["results"][1]["label"] == alone[0]["label"]
    assert mixed["results"][1]["probabilities"] == pytest.approx(alone[0]["probabilities"], abs=1e-5)  # padding


def test_server_model_auto_without_a_library_is_a_clear_400(folders, tiny_bert):
    engine = engine_from_options(str(tiny_bert), folders)
    [error] = engine.classify([Work("auto", ["good movie"])])
    assert error.status == 400 and "--library DB" in error.message


def test_cli_serve_takes_a_library_or_a_folder_not_both(capsys):
    from deltatune.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "minilm", "--library", "deltas.db"])
    assert (args.library, args.deltas) == ("deltas.db", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "minilm", "--library", "a.db", "--deltas", "dir"])
    assert "not allowed with argument" in capsys.readouterr().err
