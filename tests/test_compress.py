"""Delta compression against exact references: quantisation bounds, hand-computed ternary
codes, a sort-based top-k, and the uncompressed delta's own tensors and outputs."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from tiny_models import MODELS

import deltatune as dt
from deltatune.algebra.compress import compress, quantize_int8, quantize_ternary, top_k_mask
from deltatune.cli import main
from deltatune.errors import ConfigError, DeltaFileError, FingerprintError
from deltatune.io.artifact import read_meta, read_tensors
from deltatune.io.compressed import pack_digits, unpack_digits

CASE = MODELS["bert"]


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- tensor functions ----------------------------------------------------------------------------

def test_int8_codes_are_within_half_a_step_of_every_element():
    values = _random(1000, seed=1) * 3
    codes, scale = quantize_int8(values)
    assert codes.dtype == torch.int8 and scale == pytest.approx(float(values.abs().max()) / 127, rel=1e-12)
    assert int(codes.abs().max()) == 127
    error = (values.double() - codes.double() * scale).abs()
    assert float(error.max()) <= scale / 2 * (1 + 1e-9)


def test_ternary_codes_on_a_hand_computed_case():
    # mean |x| = 6.1 / 4 = 1.525, threshold 0.7 * 1.525 = 1.0675: keep -2 and 3, scale (2 + 3) / 2
    codes, scale = quantize_ternary(torch.tensor([1.0, -2.0, 0.1, 3.0]))
    assert codes.tolist() == [0, -1, 0, 1] and scale == pytest.approx(2.5)


def test_ternary_values_are_minus_s_zero_or_s_with_the_best_s_for_their_support():
    values = _random(500, seed=2)
    codes, scale = quantize_ternary(values)
    assert set(codes.unique().tolist()) == {-1, 0, 1}

    def error(s: float) -> float:
        return float((values.double() - codes.double() * s).square().sum())

    assert error(scale) < error(scale * 1.01) and error(scale) < error(scale * 0.99)


def test_top_k_keeps_exactly_the_k_largest_magnitudes():
    values = _random(7, 13, seed=3)
    mask = top_k_mask(values, 0.3)
    count = math.ceil(0.3 * values.numel())
    largest = set(sorted(range(values.numel()), key=lambda i: -abs(float(values.reshape(-1)[i])))[:count])
    assert mask.shape == values.shape and int(mask.sum()) == count
    assert set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()) == largest


@pytest.mark.parametrize(("base", "per_byte"), [(2, 8), (3, 5)])
@pytest.mark.parametrize("count", [1, 7, 8, 41])
def test_packed_digits_unpack_to_themselves(base, per_byte, count):
    digits = torch.randint(0, base, (count,), generator=torch.Generator().manual_seed(count))
    packed = pack_digits(digits, base, per_byte)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count / per_byte)
    assert torch.equal(unpack_digits(packed, base, per_byte, count), digits)


# -- compressed delta files ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LoRA + head delta on tiny BERT with non-zero factors, and the model's outputs with it."""
    folder = tmp_path_factory.mktemp("delta")
    model = CASE.build(0)
    dt.attach(model, dt.LoRAConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, "default"):
            param.copy_(torch.randn_like(param) * 0.2)
    dt.save(model, folder)
    with dt.base_only(model):
        base_output = CASE.output(model)
    return folder, CASE.output(model).detach(), base_output.detach()


def _loaded_output(folder) -> torch.Tensor:
    model = CASE.build(0)
    dt.load(model, folder)
    return CASE.output(model).detach()


def test_density_one_reloads_the_exact_delta(saved, tmp_path):
    folder, output, _ = saved
    compress(folder, tmp_path / "c", density=1.0)
    assert torch.equal(_loaded_output(tmp_path / "c"), output)


def test_int8_delta_loads_within_the_quantisation_bound_and_is_smaller(saved, tmp_path):
    folder, output, base_output = saved
    report = compress(folder, tmp_path / "c", bits=8)
    original = read_tensors(folder, read_meta(folder))
    restored = read_tensors(tmp_path / "c", read_meta(tmp_path / "c"))
    for key, value in original.items():
        if value.dim() < 2:
            assert torch.equal(restored[key], value)  # vectors are stored as they were
        else:
            step = float(value.abs().max()) / 127
            assert float((restored[key] - value).abs().max()) <= step / 2 + 1e-6
    change = (output - base_output).abs().max()
    assert float((_loaded_output(tmp_path / "c") - output).abs().max()) < 0.01 * float(change)
    sizes = (folder / "delta.safetensors").stat().st_size, (tmp_path / "c" / "delta.safetensors").stat().st_size
    assert (report.bytes_before, report.bytes_after) == sizes and report.ratio == sizes[0] / sizes[1]
    # payload: one byte per compressed element plus a 4-byte scale per tensor; vectors keep their 4 bytes
    stored = safetensors.torch.load_file(str(tmp_path / "c" / "delta.safetensors"))
    expected = sum(v.numel() + 4 if v.dim() >= 2 else v.numel() * 4 for v in original.values())
    assert sum(v.numel() * v.element_size() for v in stored.values()) == expected


def test_sparsified_delta_keeps_the_largest_elements_and_zeroes_the_rest(saved, tmp_path):
    folder, _, _ = saved
    compress(folder, tmp_path / "c", density=0.25)
    original = read_tensors(folder, read_meta(folder))
    restored = read_tensors(tmp_path / "c", read_meta(tmp_path / "c"))
    for key, value in original.items():
        if value.dim() >= 2:
            mask = top_k_mask(value, 0.25)
            assert torch.equal(restored[key][mask], value[mask]) and not restored[key][~mask].any()


def test_ternary_and_sparse_delta_holds_three_values_per_tensor(saved, tmp_path):
    folder, _, _ = saved
    report = compress(folder, tmp_path / "c", density=0.5, bits="ternary")
    restored = read_tensors(tmp_path / "c", read_meta(tmp_path / "c"))
    for key in report.compressed:
        levels = restored[key].unique()
        assert len(levels) == 3 and levels[1] == 0 and levels[0] == -levels[2]
    assert 0 < report.relative_error < 1


def test_compressed_delta_keeps_the_fingerprint_and_the_checksum(saved, tmp_path):
    folder, _, _ = saved
    compress(folder, tmp_path / "c", bits=8)
    before, after = read_meta(folder), read_meta(tmp_path / "c")
    assert after["base"] == before["base"] and after["tensors"] == before["tensors"]
    assert after["compression"]["bits"] == 8 and after["tensors_sha256"] != before["tensors_sha256"]
    with pytest.raises(FingerprintError):
        dt.load(CASE.build(seed=1), tmp_path / "c")


def test_a_corrupted_compressed_file_is_refused(saved, tmp_path):
    folder, _, _ = saved
    compress(folder, tmp_path / "c", density=0.5, bits=8)
    tensor_file = tmp_path / "c" / "delta.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-3] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(DeltaFileError, match="checksum"):
        dt.load(CASE.build(0), tmp_path / "c")


def _rewrite(folder, change) -> None:
    """Change the stored tensors and record the new checksum, as a buggy writer would."""
    import hashlib

    tensor_file = folder / "delta.safetensors"
    stored = safetensors.torch.load_file(str(tensor_file))
    change(stored)
    safetensors.torch.save_file(stored, str(tensor_file))
    meta = json.loads((folder / "delta.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
    (folder / "delta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("bits", "change", "message"), [
    (8, lambda s: s.update({k: v[:-1] for k, v in s.items() if k.endswith("#values")}), "elements, expected"),
    (2, lambda s: s.update({k: torch.full_like(v, 255) for k, v in s.items() if k.endswith("#values")}), "out of range"),
    (8, lambda s: s.pop(next(k for k in s if k.endswith("#scale"))), "lacks the tensor"),
    (8, lambda s: s.update({"stray": torch.zeros(1)}), "does not describe"),
])
def test_inconsistent_compressed_parts_are_refused(saved, tmp_path, bits, change, message):
    folder, _, _ = saved
    compress(folder, tmp_path / "c", density=0.5, bits=bits)
    _rewrite(tmp_path / "c", change)
    with pytest.raises(DeltaFileError, match=message):
        dt.load(CASE.build(0), tmp_path / "c")


@pytest.mark.parametrize(("density", "bits", "message"), [
    (0.0, None, "density must be"), (1.5, None, "density must be"), (None, 4, "bits must be 8"),
    (None, None, "needs density"),
])
def test_bad_density_or_bits_is_refused(saved, tmp_path, density, bits, message):
    folder, _, _ = saved
    with pytest.raises(ConfigError, match=message):
        compress(folder, tmp_path / "c", density=density, bits=bits)
    assert not (tmp_path / "c").exists()


def test_compress_command_prints_the_ratio_and_refuses_bad_bits(saved, tmp_path, capsys):
    folder, output, _ = saved
    assert main(["compress", str(folder), "--density", "0.5", "--bits", "8", "--out", str(tmp_path / "c")]) == 0
    assert "x smaller" in capsys.readouterr().out
    assert _loaded_output(tmp_path / "c").shape == output.shape
    assert main(["compress", str(folder), "--bits", "4", "--out", str(tmp_path / "d")]) == 2
    assert "bits must be 8 (int8) or 2 (ternary)" in capsys.readouterr().err
