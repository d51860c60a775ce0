"""Carrying a wheel to the device in parts: split, check, join, extract."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from sparseinfer.benchmarks.carry_parts import MANIFEST, PART, split_wheel, unpack_parts
from sparseinfer.reference.errors import SparseInferError


@pytest.fixture
def wheel(tmp_path):
    rng = np.random.default_rng(0)
    files = {"pkg/__init__.py": b"VERSION = 1\n", "pkg/capi/libcore.so.1": rng.bytes(30_000),
             "pkg/capi/libbig_tensorrt.so": rng.bytes(20_000), "pkg-1.0.dist-info/METADATA": b"Name: pkg\n"}
    path = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path, files


def test_parts_join_back_into_the_wheel_minus_the_excluded_files(wheel, tmp_path):
    path, files = wheel
    dirs = split_wheel(path, tmp_path / "carry" / "w", part_bytes=7_000, exclude=("*tensorrt*",))
    sizes = [(d / PART).stat().st_size for d in dirs]
    assert len(dirs) >= 4 and max(sizes) <= 7_000 and [d.name for d in dirs] == [f"w-{i}" for i in range(1, len(dirs) + 1)]
    out = unpack_parts(tmp_path / "carry" / "w", tmp_path / "site")
    for name, data in files.items():
        target = out / name
        assert target.exists() == ("tensorrt" not in name)
        if target.exists():
            assert target.read_bytes() == data
    assert (out / "pkg/capi/libcore.so.1").stat().st_mode & 0o111          # shared libraries stay executable


def test_a_missing_or_damaged_part_is_a_one_line_error(wheel, tmp_path):
    path, _ = wheel
    dirs = split_wheel(path, tmp_path / "w", part_bytes=7_000)
    last = dirs[-1] / PART
    last.write_bytes(last.read_bytes()[:-1] + b"\0")
    with pytest.raises(SparseInferError, match=rf"part {len(dirs)} .* does not match the manifest"):
        unpack_parts(tmp_path / "w", tmp_path / "site")
    (dirs[1] / PART).unlink()
    with pytest.raises(SparseInferError, match=rf"part 2 of {len(dirs)} is missing"):
        unpack_parts(tmp_path / "w", tmp_path / "site")
    with pytest.raises(SparseInferError, match="no manifest"):
        unpack_parts(tmp_path / "elsewhere", tmp_path / "site")
    assert json.loads((dirs[0] / MANIFEST).read_text())["source"] == path.name


def test_bad_wheels_are_one_line_errors(tmp_path):
    with pytest.raises(SparseInferError, match="no such wheel"):
        split_wheel(tmp_path / "none.whl", tmp_path / "w", 1000)
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SparseInferError, match="is not a wheel"):
        split_wheel(bad, tmp_path / "w", 1000)
