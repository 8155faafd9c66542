"""Hot swap: in-place replace and the bounded LRU cache of loaded deltas.

Reference: the saved delta loaded with ``dt.load`` onto a fresh copy of the base.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import MODELS, small_config

import deltatune as dt
from deltatune.core.slot import slot_sites
from deltatune.errors import ConfigError, DeltaFileError, DeltaStateError
from deltatune import swap as cache_module
from deltatune.swap import DeltaCache, delta_bytes, replace

CASE = MODELS["bert"]


def _config(**fields):
    return small_config("lora", CASE, modules_to_save=("classifier",), **fields)


def _saved(tmp_path, label: str, seed: int, **fields):
    """A delta folder: LoRA (+ head) with seeded random tensors, trained-looking."""
    model = CASE.build()
    dt.attach(model, _config(**fields), name=label)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, label):
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return dt.save(model, tmp_path / label, label)


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        return CASE.output(model)


def _fresh_output(directory) -> torch.Tensor:
    fresh = CASE.build()
    dt.load(fresh, directory)
    return _output(fresh)


def _units(model, name):
    return {path: slot[name] for path, _, slot in slot_sites(model) if name in slot}


def _tensors(model, name):
    return {key: p.detach().clone() for key, p in dt.delta_parameters(model, name)}


def test_replace_in_place_keeps_the_units_and_gives_the_new_deltas_outputs(tmp_path):
    first, second = _saved(tmp_path, "v1", 1), _saved(tmp_path, "v2", 2)
    model = CASE.build()
    dt.load(model, first, "live")
    units, before = _units(model, "live"), _output(model)
    modules = {id(m) for m in model.modules()}
    result = replace(model, "live", second)
    assert result.in_place and result.reason is None
    assert {p: id(u) for p, u in _units(model, "live").items()} == {p: id(u) for p, u in units.items()}
    assert {id(m) for m in model.modules()} == modules  # no module built or dropped
    after = _output(model)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _fresh_output(second), rtol=0, atol=0)


def test_replace_updates_rows_of_a_cached_mixed_batch(tmp_path):
    first, second, other = _saved(tmp_path, "v1", 1), _saved(tmp_path, "v2", 2), _saved(tmp_path, "o", 3)
    model = CASE.build()
    dt.load(model, first, "live")
    dt.load(model, other, "other")
    inputs = CASE.inputs()
    rows = ["live", "other", "live"]
    with torch.no_grad():
        model(**inputs, delta_ids=rows)  # stacks and caches the deltas' weights
        replace(model, "live", second)
        mixed = model(**inputs, delta_ids=rows).logits
    torch.testing.assert_close(mixed[0], _fresh_output(second)[0], rtol=1e-5, atol=1e-5)


def test_replace_with_another_config_reloads_and_says_why(tmp_path):
    first, other_rank = _saved(tmp_path, "v1", 1), _saved(tmp_path, "r2", 2, r=2)
    model = CASE.build()
    dt.load(model, first, "live")
    dt.load(model, first, "bystander", activate=False)
    dt.set_active(model, ["live"])
    result = replace(model, "live", other_rank)
    assert not result.in_place and "config differs in ['r']" in result.reason
    assert dt.get_config(model, "live").r == 2 and dt.active_deltas(model) == ("live",)
    torch.testing.assert_close(_output(model), _fresh_output(other_rank), rtol=0, atol=0)


def test_a_corrupt_file_leaves_the_live_delta_untouched(tmp_path):
    first, second = _saved(tmp_path, "v1", 1), _saved(tmp_path, "v2", 2)
    tensor_file = second / "delta.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-20:] = bytes(20)
    tensor_file.write_bytes(bytes(data))
    model = CASE.build()
    dt.load(model, first, "live")
    before, units = _tensors(model, "live"), _units(model, "live")
    with pytest.raises(DeltaFileError, match="does not match the checksum"):
        replace(model, "live", second)
    after = _tensors(model, "live")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p: id(u) for p, u in _units(model, "live").items()} == {p: id(u) for p, u in units.items()}


def test_a_failed_reload_puts_the_old_delta_back(tmp_path, monkeypatch):
    first, other_rank = _saved(tmp_path, "v1", 1), _saved(tmp_path, "r2", 2, r=2)
    model = CASE.build()
    dt.load(model, first, "live")
    before = _output(model)

    def failing_load(*args, **kwargs):
        raise DeltaFileError("disk vanished")

    monkeypatch.setattr(cache_module, "load", failing_load)
    with pytest.raises(DeltaFileError, match="disk vanished"):
        replace(model, "live", other_rank)
    assert dt.list_deltas(model) == ["live"] and dt.active_deltas(model) == ("live",)
    assert dt.get_config(model, "live").r == 4
    torch.testing.assert_close(_output(model), before, rtol=0, atol=0)


@pytest.fixture
def folders(tmp_path):
    return {label: _saved(tmp_path, label, seed) for seed, label in enumerate("abcd", start=1)}


def test_cache_evicts_the_least_recently_used_beyond_the_count(folders):
    model = CASE.build()
    cache = DeltaCache(model, max_deltas=2)
    for name in ("a", "b", "a", "c"):  # "a" used again, so "b" is the least recent
        cache.get(name, folders[name])
    assert cache.loaded() == ["a", "c"] and dt.list_deltas(model) == ["a", "c"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.deltas) == (1, 3, 1, 2)
    assert stats.bytes == delta_bytes(model, "a") + delta_bytes(model, "c")
    with dt.using(model, cache.get("c")):  # a hit needs no folder
        torch.testing.assert_close(_output(model), _fresh_output(folders["c"]), rtol=0, atol=0)


def test_cache_bounds_the_bytes(folders):
    model = CASE.build()
    dt.load(model, folders["a"], "probe")
    size = delta_bytes(model, "probe")
    dt.delete(model, "probe")
    cache = DeltaCache(model, max_bytes=2 * size + size // 2)
    for name in "abc":
        cache.get(name, folders[name])
    assert cache.loaded() == ["b", "c"] and cache.stats().bytes == 2 * size
    small = DeltaCache(CASE.build(), max_bytes=size - 1)
    with pytest.raises(DeltaStateError, match=rf"holds {size} bytes, more than the cache's max_bytes"):
        small.get("a", folders["a"])
    assert dt.list_deltas(small.model) == []


def test_pinned_active_and_routed_deltas_are_never_evicted(folders):
    model = CASE.build()
    cache = DeltaCache(model, max_deltas=1)
    cache.get("a", folders["a"])
    cache.pin("a")
    cache.get("b", folders["b"])
    assert cache.loaded() == ["a", "b"]  # over the bound: nothing else may go
    dt.set_active(model, "b")
    cache.get("c", folders["c"])
    assert cache.loaded() == ["a", "b", "c"]
    with pytest.raises(DeltaStateError, match="pinned, active or routed"):
        cache.evict("b")
    dt.set_active(model, None)
    with dt.route(model, ["c", None, "c"]):
        cache.get("d", folders["d"])  # b may go now; c is routed
    assert cache.loaded() == ["a", "c", "d"]
    cache.unpin("a")
    assert cache.loaded() == ["d"]


def test_cache_refuses_unknown_deltas_and_bad_bounds(folders):
    model = CASE.build()
    dt.load(model, folders["a"], "outsider")
    cache = DeltaCache(model, max_deltas=1)
    with pytest.raises(DeltaStateError, match="attached to the model outside this cache"):
        cache.get("outsider", folders["a"])
    with pytest.raises(DeltaStateError, match="not loaded; pass the folder"):
        cache.get("b")
    with pytest.raises(ConfigError, match="max_deltas must be a positive integer"):
        DeltaCache(model, max_deltas=0)


def test_cache_is_consistent_under_concurrent_gets(folders):
    model = CASE.build()
    cache = DeltaCache(model, max_deltas=2)
    errors = []

    def worker(order):
        try:
            for name in order * 5:
                cache.get(name, folders[name])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(order,)) for order in ("abc", "bcd", "cda")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = cache.stats()
    assert stats.hits + stats.misses == 45 and stats.misses - stats.evictions == stats.deltas == 2
    assert sorted(cache.loaded()) == sorted(dt.list_deltas(model))
