"""Fuzzing the files deltatune reads: delta folders, compressed delta folders, peft adapter folders.

Property: a mutated folder is either refused with a :class:`deltatune.DeltaError` (and the model
is left exactly as it was), or it loads and the model's outputs equal, bit for bit, those of
the unmutated folder. One mutation per example, one of:

- ``flip``: XOR one byte with a non-zero byte;
- ``truncate``: cut the file short;
- ``insert``: insert 1 to 8 random bytes;
- ``value``: in a JSON file, replace one value (a leaf or a whole object/list) by a value of
  another JSON type (string, number, null, list, object, boolean);
- ``remove``: in a JSON file, remove one object member.

Byte mutations of a tensor file are tried twice: as they are (the checksum in ``delta.json``
catches them), and with ``tensors_sha256`` updated (as a tool that rewrote the tensor file and
its checksum would leave it), which takes them past the checksum to the safetensors parser and
the shape, dtype, NaN and compressed-part checks; ``description_sha256`` still refuses them.

A peft adapter folder has no checksum: a changed byte in ``adapter_model.safetensors`` or in a
number of ``adapter_config.json`` is another valid adapter, and a removed option takes peft's
default, as in peft itself. For those mutations only "a DeltaError or a load" is asserted.

Examples per target: ``DELTATUNE_FUZZ_EXAMPLES`` (default 40). ``derandomize=True`` makes every
run try the same examples (reproducible in CI); a larger count runs further along the same
sequence. ``DELTATUNE_FUZZ_REPORT=<file>`` writes the outcome counts there as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import MODELS

import deltatune as dt
from deltatune.algebra.compress import compress
from deltatune.interop import load_peft, save_peft
from deltatune.io.artifact import file_sha256

EXAMPLES = int(os.environ.get("DELTATUNE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES: collections.Counter = collections.Counter()

#: outcome buckets for the report: the first pattern found in the error message
KINDS = [
    ("schema (field type or missing field)", r"field '"),
    ("not JSON / not an object / wrong format", r"not valid JSON|is not a deltatune|not a peft adapter config|JSON object"),
    ("tensor checksum", r"does not match the checksum"),
    ("description seal", r"description_sha256"),
    ("safetensors header or data", r"cannot be read as safetensors"),
    ("module not in this model", r"does not fit this|does not have"),
    ("unsupported peft option", r"is not supported"),
    ("config value", r"Config|config"),
    ("tensor list, shape or dtype", r"shape|dtype|differ from the list|do not fit|missing|unexpected|rank"),
    ("compressed parts", r"compressed|quantisation|ternary|elements, expected|lacks the tensor"),
    ("NaN or inf", r"NaN or inf"),
]


class Target:
    """A folder to mutate, how to load it, and the outputs its unmutated files give."""

    def __init__(self, case: str, folder: Path, peft: bool) -> None:
        self.case, self.folder, self.peft = MODELS[case], folder, peft
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.model = self.case.build(0)
        with torch.no_grad():
            self.base_output = self.case.output(self.model).detach().clone()
        self.output = self.load_output(folder)
        assert not torch.equal(self.output, self.base_output), "the delta must change the outputs"

    def load(self, folder: Path) -> None:
        if self.peft:
            load_peft(self.model, folder, name="fuzz")
        else:
            dt.load(self.model, folder, name="fuzz")

    def load_output(self, folder: Path) -> torch.Tensor:
        self.load(folder)
        try:
            with torch.no_grad():
                return self.case.output(self.model).detach().clone()
        finally:
            dt.delete(self.model, "fuzz")

    def unchanged(self) -> bool:
        with torch.no_grad():
            return dt.list_deltas(self.model) == [] and torch.equal(self.case.output(self.model), self.base_output)


def _nonzero(model, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, name):
            param.copy_(torch.randn_like(param) * 0.2)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    gpt2 = MODELS["gpt2"].build(0)
    dt.attach(gpt2, dt.LoRAConfig(r=2, alpha=4), name="chat")
    _nonzero(gpt2, "chat", 1)
    dt.save(gpt2, root / "lora", metrics={"loss": 1.5, "labels": ["a", "b"]})

    bert = MODELS["bert"].build(0)
    dt.attach(bert, dt.LoRAConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"]), name="cls")
    _nonzero(bert, "cls", 2)
    dt.save(bert, root / "plain-bert")
    compress(root / "plain-bert", root / "compressed", density=0.5, bits=8)

    llama = MODELS["llama"].build(0)
    dt.attach(llama, dt.LoRAConfig(r=2, alpha=8, use_rslora=True, targets=["q_proj", "v_proj"]), name="peft")
    _nonzero(llama, "peft", 3)
    save_peft(llama, root / "peft")
    yield {"lora": Target("gpt2", root / "lora", False),
           "compressed": Target("bert", root / "compressed", False),
           "peft": Target("llama", root / "peft", True)}
    report = os.environ.get("DELTATUNE_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(sorted(OUTCOMES.items())), indent=2) + "\n")


# -- mutations ------------------------------------------------------------------------------------

def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "str", type(None): "null", list: "list", dict: "dict"}[type(value)]


JSON_VALUES = {
    "str": st.text(max_size=6),
    "number": st.one_of(st.integers(-3, 10**12), st.floats(allow_nan=False, allow_infinity=False)),
    "null": st.none(),
    "list": st.lists(st.one_of(st.integers(-2, 9), st.text(max_size=3)), max_size=3),
    "dict": st.dictionaries(st.text(max_size=3), st.integers(-2, 9), max_size=2),
    "bool": st.booleans(),
}


def _paths(value, prefix=()):
    """Every path to a value inside a parsed JSON document (the root excluded)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _at(document, path):
    for key in path:
        document = document[key]
    return document


def _header_end(data: bytes) -> int:
    """Where a safetensors file's JSON header ends (the whole file if it cannot tell)."""
    if len(data) < 8:
        return len(data)
    return min(len(data), 8 + struct.unpack("<Q", data[:8])[0])


@st.composite
def mutations(draw, target: Target):
    """(file name, new bytes, how, whether the outputs may legitimately change) for one mutation."""
    name = draw(st.sampled_from(sorted(target.files)))
    data = target.files[name]
    is_json = name.endswith(".json")
    how = draw(st.sampled_from(["flip", "truncate", "insert", "value", "remove"] if is_json else
                               ["flip", "truncate", "insert"]))
    if how in ("value", "remove"):
        document = json.loads(data)
        paths = [p for p in _paths(document) if how == "value" or isinstance(_at(document, p[:-1]), dict)]
        path = draw(st.sampled_from(paths))
        parent = _at(document, path[:-1])
        if how == "remove":
            del parent[path[-1]]
        else:
            other = sorted(set(JSON_VALUES) - {_kind(parent[path[-1]])})
            parent[path[-1]] = draw(JSON_VALUES[draw(st.sampled_from(other))])
        data = json.dumps(document, indent=2).encode()
        how = f"{how} {'.'.join(map(str, path))}"
    else:
        # half of the positions in a safetensors file fall in its header, the part a parser reads
        end = len(data) if is_json or draw(st.booleans()) else _header_end(data)
        position = draw(st.integers(0, max(0, end - 1)))
        if how == "flip":
            data = data[:position] + bytes([data[position] ^ draw(st.integers(1, 255))]) + data[position + 1:]
        elif how == "truncate":
            data = data[:position]
        else:
            data = data[:position] + draw(st.binary(min_size=1, max_size=8)) + data[position:]
        how = f"{how} at {position}"
    may_change = target.peft and (not is_json or not how.startswith("value"))
    return name, data, how, may_change


def _write(target: Target, name: str, data: bytes, rehash: bool) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    for file, content in target.files.items():
        (folder / file).write_bytes(data if file == name else content)
    if rehash:
        meta = json.loads(target.files["delta.json"])
        meta["tensors_sha256"] = file_sha256(folder / name)
        (folder / "delta.json").write_text(json.dumps(meta, indent=2))
    return folder


def _bucket(error: Exception) -> str:
    if isinstance(error, dt.FingerprintError):
        return "base fingerprint"
    message = str(error)
    return next((kind for kind, pattern in KINDS if re.search(pattern, message)), type(error).__name__)


def _check(target: Target, name: str, data: bytes, how: str, may_change: bool, rehash: bool, label: str) -> None:
    folder = _write(target, name, data, rehash)
    try:
        try:
            target.load(folder)
        except dt.DeltaError as error:
            OUTCOMES[f"{label}: DeltaError: {_bucket(error)}"] += 1
            assert target.unchanged(), f"{how} in {name}: the refused load changed the model ({error})"
            return
        try:
            with torch.no_grad():
                output = target.case.output(target.model)
        finally:
            dt.delete(target.model, "fuzz")
        same = torch.equal(output, target.output)
        OUTCOMES[f"{label}: loaded, {'same outputs' if same else 'other outputs (peft, no checksum)'}"] += 1
        assert same or may_change, f"{how} in {name}{' (rehashed)' if rehash else ''} loaded with other outputs"
    finally:
        OUTCOMES[f"{label}: mutations tried"] += 1
        shutil.rmtree(folder)


@pytest.mark.parametrize("label", ["lora", "compressed", "peft"])
def test_a_mutated_folder_is_refused_with_a_delta_error_or_loads_the_same_delta(targets, label):
    target = targets[label]

    @FUZZ
    @given(mutation=mutations(target), rehash=st.booleans())
    def run(mutation, rehash):
        name, data, how, may_change = mutation
        rehash = rehash and name == "delta.safetensors"
        _check(target, name, data, how, may_change, rehash, label)

    run()


# -- one plain case per kind of error: the exact message ------------------------------------------

LORA_A = "transformer.h.0.attn.c_attn.lora_A"


def _edited(target: Target, change, file: str = "delta.json", seal: bool = False) -> Path:
    """A copy of the target's folder with ``change`` applied to the parsed JSON ``file``."""
    document = json.loads(target.files[file])
    change(document)
    if seal:
        document = dt.io.schema.seal(document)
    return _write(target, file, json.dumps(document).encode(), rehash=False)


def _refused(target: Target, folder: Path, error=dt.DeltaFileError) -> str:
    try:
        with pytest.raises(error) as raised:
            target.load(folder)
        assert target.unchanged()
        return str(raised.value).replace(str(folder) + os.sep, "")
    finally:
        if "fuzz" in dt.list_deltas(target.model):
            dt.delete(target.model, "fuzz")
        shutil.rmtree(folder)


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["tensors"][LORA_A].update(shape="abc"),
     f"field 'tensors.{LORA_A}.shape' must be a list of integers >= 0, got 'abc'"),
    (lambda m: m["tensors"][LORA_A].update(shape=[2, -32]), f"field 'tensors.{LORA_A}.shape[1]' must be an integer >= 0, got -32"),
    (lambda m: m["tensors"][LORA_A].update(dtype="float33"),
     f"field 'tensors.{LORA_A}.dtype' must be a torch dtype name such as 'float32', got 'float33'"),
    (lambda m: m.pop("tensors_sha256"), "field 'tensors_sha256' is missing (it must be a SHA-256 digest (64 hex digits))"),
    (lambda m: m.update(config=3.5), "field 'config' must be an object, got 3.5"),
    (lambda m: m.update(sites="transformer.h.0.attn.c_attn"),
     "field 'sites' must be a list of strings, got 'transformer.h.0.attn.c_attn'"),
    (lambda m: m["base"].update(modules={}), "field 'base.modules' must be an object mapping module paths to digests, got {}"),
    (lambda m: m.update(labels=3), "field 'labels' must be a list of strings or null, got 3"),
    (lambda m: m.update(task=["chat"]), "field 'task' must be a string or null, got ['chat']"),
    (lambda m: m["config"].update(method="ia3"), "field 'config.method' is 'ia3' but field 'method' is 'lora'"),
])
def test_a_wrong_typed_or_missing_field_names_the_field_and_the_expected_type(targets, change, message):
    text = _refused(targets["lora"], _edited(targets["lora"], change))
    assert text == f"delta.json: {message}; the file is corrupt or was edited by hand; save the delta again"


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["config"].update(r="2"), "LoRAConfig: field 'r' must be an integer, got '2'"),
    (lambda m: m["config"].update(targets=3.5), "LoRAConfig: field 'targets' must be a list of strings or null, got 3.5"),
    (lambda m: m["config"].update(use_rslora=1), "LoRAConfig: field 'use_rslora' must be true or false, got 1"),
    (lambda m: m["config"].update(init="xavier"), "LoRAConfig: field 'init' must be 'kaiming' or 'gaussian', got 'xavier'"),
])
def test_a_wrong_typed_config_value_names_the_config_field(targets, change, message):
    # sealed again, as a tool that writes a consistent but wrong file would: the type check still names it
    text = _refused(targets["lora"], _edited(targets["lora"], lambda m: (change(m), m.update(method=m["config"]["method"])),
                                             seal=True))
    assert text.startswith(f"delta.json: field 'config' is invalid: {message}")


def test_config_from_dict_refuses_wrong_types_by_field():
    with pytest.raises(dt.ConfigError, match=r"^LoRAConfig: field 'r' must be an integer, got '8'$"):
        dt.config_from_dict({"method": "lora", "r": "8"})
    with pytest.raises(dt.ConfigError, match=r"^LoRAConfig: field 'rank_pattern.q' must be an integer, got 2.5$"):
        dt.config_from_dict({"method": "lora", "rank_pattern": {"q": 2.5}})
    with pytest.raises(dt.ConfigError, match="a delta config is a JSON object with a 'method' field, got 3.5"):
        dt.config_from_dict(3.5)
    assert dt.config_from_dict({"method": "lora", "targets": "query", "alpha": 8}).targets == ("query",)


def test_a_changed_sealed_value_is_refused_and_loads_once_the_seal_is_removed(targets):
    target = targets["lora"]
    text = _refused(target, _edited(target, lambda m: m["config"].update(alpha=5.0)))
    assert text.startswith("delta.json: the fields that decide what loads (format, schema_version, method, config, ")
    assert text.endswith("To keep a deliberate edit, remove 'description_sha256'.")
    folder = _edited(target, lambda m: (m["config"].update(alpha=5.0), m.pop("description_sha256")))
    try:
        assert not torch.equal(target.load_output(folder), target.output)
    finally:
        shutil.rmtree(folder)


def test_unknown_fields_are_kept_for_forward_compatibility(targets):
    folder = _edited(targets["lora"], lambda m: m.update(added_by_a_newer_version={"x": 1}))
    try:
        assert torch.equal(targets["lora"].load_output(folder), targets["lora"].output)
        assert dt.read_meta(folder)["added_by_a_newer_version"] == {"x": 1}
    finally:
        shutil.rmtree(folder)


def test_a_description_that_is_not_an_object_or_from_a_newer_version_is_refused(targets):
    target = targets["lora"]
    text = _refused(target, _write(target, "delta.json", b"[1, 2]", rehash=False))
    assert text == "delta.json holds list JSON, not a JSON object; the file is corrupt or was edited by hand; save the delta again"
    text = _refused(target, _edited(target, lambda m: m.update(schema_version=99)))
    assert text == "delta.json has schema version 99; upgrade deltatune to read it"


def test_a_tensor_whose_dtype_differs_from_the_description_is_refused(targets, tmp_path):
    import safetensors.torch

    target = targets["lora"]
    stored = safetensors.torch.load(target.files["delta.safetensors"])
    stored[LORA_A] = stored[LORA_A].double()
    folder = _write(target, "delta.safetensors", safetensors.torch.save(stored), rehash=True)
    assert _refused(target, folder) == (f"tensor '{LORA_A}' has dtype torch.float64 but delta.json says float32; "
                                        f"the file is corrupt or was edited by hand; save the delta again")


def test_a_corrupt_safetensors_header_behind_a_matching_checksum_is_refused(targets):
    target = targets["lora"]
    data = target.files["delta.safetensors"]
    folder = _write(target, "delta.safetensors", data[:8] + b"[" + data[9:], rehash=True)
    assert _refused(target, folder).startswith("delta.safetensors cannot be read as safetensors:")


def test_recorded_fingerprint_whose_module_digests_match_but_combined_one_does_not_is_refused(targets):
    target = targets["lora"]
    text = _refused(target, _edited(target, lambda m: m["base"].update(sha256="0" * 64)), dt.FingerprintError)
    assert "its per-module digests match but the combined fingerprint does not" in text


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(r="2"), "field 'r' must be an integer >= 0, got '2'"),
    (lambda c: c.update(lora_alpha="8"), "field 'lora_alpha' must be a number, got '8'"),
    (lambda c: c.update(use_rslora=1), "field 'use_rslora' must be true or false, got 1"),
    (lambda c: c.update(modules_to_save="lm_head"), "field 'modules_to_save' must be a list of strings or null, got 'lm_head'"),
    (lambda c: c.update(feedforward_modules=3), "field 'feedforward_modules' must be a string or a list of strings or null, got 3"),
    (lambda c: c.update(rank_pattern={"q_proj": 0}), "field 'rank_pattern.q_proj' must be an integer > 0 or a list of booleans, got 0"),
])
def test_a_wrong_typed_peft_adapter_config_field_names_the_field(targets, change, message):
    target = targets["peft"]
    text = _refused(target, _edited(target, change, file="adapter_config.json"))
    assert text == f"adapter_config.json: {message}; the file is corrupt or was edited by hand; save the adapter again"
