"""What a result records of huge pages (model_export/machine.py), and bench-decode's note where
onnxruntime's packed weights would sit on 4 KiB pages."""
import json
import os

import pytest
from click.testing import CliRunner
from helpers import one_line_error

from sparseinfer.model_export import machine
from sparseinfer.model_export.machine import (glibc_version, huge_page_note, huge_pages, malloc_hugetlb,
                                              transparent_huge_pages)
from sparseinfer.tools.cli import cli


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("always madvise never\n", None),
                                        ("", None)])
def test_transparent_huge_pages_reads_the_bracketed_mode(tmp_path, text, mode):
    f = tmp_path / "enabled"
    f.write_text(text)
    assert transparent_huge_pages(f) == mode


def test_transparent_huge_pages_is_none_where_the_file_is_missing_or_unreadable(tmp_path):
    assert transparent_huge_pages(tmp_path / "absent") is None
    assert transparent_huge_pages(tmp_path) is None            # a directory
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe[madvise]")
    assert transparent_huge_pages(binary) is None


@pytest.mark.parametrize("tunables, value", [
    (None, None),
    ("", None),
    ("glibc.malloc.hugetlb=1", "1"),
    ("glibc.malloc.check=3:glibc.malloc.hugetlb=2:glibc.cpu.x86_shstk=off", "2"),
    ("glibc.malloc.hugetlb=0:glibc.malloc.hugetlb=1", "1"),       # glibc takes the last
    ("glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0", "0"),
    ("glibc.malloc.hugetlb", None),                               # no value: not set
    ("glibc.malloc.hugetlbx=1:xglibc.malloc.hugetlb=1", None),    # other names
])
def test_malloc_hugetlb_reads_glibc_tunables(tunables, value):
    env = {} if tunables is None else {"GLIBC_TUNABLES": tunables}
    assert malloc_hugetlb(env) == value


@pytest.mark.parametrize("libc, version", [(("glibc", "2.36"), (2, 36)), (("glibc", "2.35"), (2, 35)),
                                           (("glibc", "2.4"), (2, 4)), (("", ""), None), (("musl", "1.2.4"), None),
                                           (("glibc", ""), None)])
def test_glibc_version(libc, version):
    assert glibc_version(lambda: libc) == version


def facts(mode="madvise", tunable=None, glibc=("glibc", "2.36"), tmp_path=None):
    f = tmp_path / "enabled"
    f.write_text({"madvise": "always [madvise] never", "always": "[always] madvise never",
                  "never": "always madvise [never]"}[mode])
    env = {} if tunable is None else {"GLIBC_TUNABLES": f"glibc.malloc.hugetlb={tunable}"}
    return huge_pages(env, f, lambda: glibc)


def test_huge_pages_records_mode_tunable_and_glibc(tmp_path):
    assert facts(tunable="1", tmp_path=tmp_path) == {"transparent_huge_pages": "madvise",
                                                     "glibc.malloc.hugetlb": "1", "glibc": "2.36"}
    assert facts("never", glibc=("musl", "1.2"), tmp_path=tmp_path) == {
        "transparent_huge_pages": "never", "glibc.malloc.hugetlb": None, "glibc": None}


def test_the_note_only_where_the_tunable_would_change_the_pages(tmp_path):
    note = huge_page_note(facts(tmp_path=tmp_path))
    assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in note and "madvise" in note and "\n" not in note
    assert huge_page_note(facts(tunable="0", tmp_path=tmp_path)) == note        # 0: malloc does not ask
    assert huge_page_note(facts(tunable="1", tmp_path=tmp_path)) is None        # asked already
    assert huge_page_note(facts(tunable="2", tmp_path=tmp_path)) is None        # hugetlbfs pages asked for
    assert huge_page_note(facts("always", tmp_path=tmp_path)) is None           # every large buffer gets them
    assert huge_page_note(facts("never", tmp_path=tmp_path)) is None            # none would
    assert huge_page_note(facts(glibc=("glibc", "2.34"), tmp_path=tmp_path)) is None    # no such tunable
    assert huge_page_note(facts(glibc=("", ""), tmp_path=tmp_path)) is None
    assert huge_page_note({"transparent_huge_pages": None, "glibc.malloc.hugetlb": None, "glibc": "2.36"}) is None


def test_machine_description_carries_the_huge_page_facts(monkeypatch, tmp_path):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    described = machine.machine_description("cpu")["huge_pages"]
    assert described["glibc.malloc.hugetlb"] == "1"
    assert described["transparent_huge_pages"] == transparent_huge_pages()


@pytest.mark.parametrize("mode, noted", [("madvise", True), ("always", False)])
def test_bench_decode_notes_4k_pages_after_its_results_on_the_cpu(tmp_path, monkeypatch, mode, noted):
    given = facts(mode, tmp_path=tmp_path)
    monkeypatch.setattr(machine, "huge_pages", lambda: given)
    monkeypatch.setattr(os, "sync", lambda: None)            # the machine's other writes are not this test's
    args = ["bench-decode", "--shape", "tiny", "--layers", "1", "--tokens", "2", "--repeats", "1",
            "--mlp-kernels", "function", "--work-dir", str(tmp_path / "w")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "sparse / dense:" in r.stdout
    assert ("note: transparent huge pages" in r.stderr) == noted
    quiet = CliRunner().invoke(cli, args + ["--json"])       # the JSON holds the facts instead
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr
    assert json.loads(quiet.stdout)["machine"]["huge_pages"] == given


def test_bad_input_stays_one_line_without_the_note(tmp_path, monkeypatch):
    given = facts("madvise", tmp_path=tmp_path)
    monkeypatch.setattr(machine, "huge_pages", lambda: given)
    r = CliRunner().invoke(cli, ["bench-decode", "--shape", "tiny", "--layers", "1", "--cuda-graph",
                                 "--work-dir", str(tmp_path / "w")])
    one_line_error(r, "--cuda-graph needs --provider cuda")
    assert not (tmp_path / "w").exists()
