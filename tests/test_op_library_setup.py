"""What the op library's build is given, without building it (no g++, headers or network
needed): onnxruntime's headers are fetched without installing anything, and where they
cannot be fetched the error says how to get them by hand; the op's domain and name reach the
C++ from one place."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from sparseinfer.model_export import mlp_functions, op_library
from sparseinfer.reference.errors import SparseInferError


def _fake_tools(monkeypatch, fail_on=None):
    """apt-get and dpkg-deb "present"; every command the fetch runs recorded instead of run:
    ``apt-get download`` leaves a .deb in its folder, ``dpkg-deb -x`` unpacks a header;
    ``fail_on``: the apt-get subcommand that fails as with no network."""
    ran = []

    def run(cmd, what, cwd=None):
        cmd = [str(c) for c in cmd]
        ran.append(cmd)
        if cmd[0] == "apt-get" and fail_on in cmd:
            raise SparseInferError(f"{what} failed: E: Could not resolve 'deb.debian.org'")
        if cmd[0] == "apt-get" and "download" in cmd:
            (Path(cwd) / f"{op_library.DEBIAN_PACKAGE}_1.0_amd64.deb").write_bytes(b"")
        if cmd[0] == "dpkg-deb":
            include = Path(cmd[3]) / "usr" / "include" / "onnxruntime"
            include.mkdir(parents=True)
            (include / op_library.ORT_HEADER).write_text("#define ORT_API_VERSION 21\n")
        return ""

    monkeypatch.setattr(op_library, "_run", run)
    monkeypatch.setattr(op_library.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return ran


def test_the_debian_fetch_downloads_and_unpacks_but_installs_nothing(tmp_path, monkeypatch):
    ran = _fake_tools(monkeypatch)
    dest = op_library.fetch_headers(tmp_path / "include" / "headers")
    assert (dest / op_library.ORT_HEADER).is_file()
    assert [c[0] for c in ran] == ["apt-get", "apt-get", "dpkg-deb"]
    for cmd in ran[:2]:
        subcommand = [w for w in cmd[1:] if not w.startswith("-")]
        assert subcommand[0] in ("update", "download"), cmd               # never install, remove, upgrade
        state = {w.split("=", 1)[0]: w.split("=", 1)[1] for w in cmd if w.startswith("-oDir::")}
        private = Path(state["-oDir::Cache"]).parent
        assert private.name.startswith("sparseinfer-apt-") and not private.exists()      # a temporary folder
        assert Path(state["-oDir::State::Lists"]).parent == private
        assert Path(state["-oDir::Etc::SourceList"]).parent == private
        assert state["-oDir::Etc::SourceParts"] == "/dev/null"
    assert ran[2][1] == "-x"                                              # dpkg-deb unpacks, never installs
    assert "dpkg" not in [c[0] for c in ran] and not any("install" in w for c in ran for w in c)


@pytest.mark.parametrize("missing", ["apt-get", "dpkg-deb"])
def test_without_apt_the_error_gives_the_commands_and_the_include_dir(tmp_path, monkeypatch, missing):
    ran = _fake_tools(monkeypatch)
    monkeypatch.setattr(op_library.shutil, "which", lambda tool: None if tool == missing else f"/usr/bin/{tool}")
    with pytest.raises(SparseInferError) as e:
        op_library.fetch_headers(tmp_path / "include" / "headers")
    message = str(e.value)
    assert ran == [] and "\n" not in message
    assert f"no {missing} to fetch them" in message and "nothing was installed" in message
    _check_by_hand(message, tmp_path / "include")


def test_without_network_the_error_gives_the_commands_and_the_include_dir(tmp_path, monkeypatch):
    _fake_tools(monkeypatch, fail_on="update")
    with pytest.raises(SparseInferError) as e:
        op_library.fetch_headers(tmp_path / "include" / "headers")
    message = str(e.value)
    assert "apt-get update" in message and "Could not resolve" in message and "\n" not in message
    _check_by_hand(message, tmp_path / "include")
    assert not (tmp_path / "include" / "headers").exists()


def _check_by_hand(message: str, folder: Path) -> None:
    """The message's shell line: a folder made, onnxruntime's release archive for this
    machine and version unpacked into it, and ORT_INCLUDE_DIR exported as its include folder."""
    import onnxruntime

    line = message.split("to get them by hand: ", 1)[1]
    steps = [shlex.split(step) for step in line.split(" && ")]
    assert steps[0] == ["mkdir", "-p", str(folder)]
    fetch, unpack = (shlex.split(part) for part in line.split(" && ")[1].split(" | "))
    version = onnxruntime.__version__.split("+")[0]
    assert fetch[0] == "curl" and fetch[-1].startswith(f"{op_library.ORT_RELEASES}/v{version}/onnxruntime-linux-")
    assert fetch[-1].endswith(f"-{version}.tgz") and unpack == ["tar", "-xz", "-C", str(folder)]
    name = fetch[-1].rsplit("/", 1)[1][:-len(".tgz")]
    assert steps[2] == ["export", f"{op_library.INCLUDE_ENV}={folder / name / 'include'}"]
    assert subprocess.run(["sh", "-n", "-c", line]).returncode == 0          # one line a shell parses


def test_the_ops_domain_and_name_reach_the_cpp_as_defines_from_one_place():
    assert mlp_functions.DOMAIN is op_library.DOMAIN and mlp_functions.OP_TYPE is op_library.OP_TYPE
    assert f'-DSPARSEINFER_OP_DOMAIN="{op_library.DOMAIN}"' in op_library.DEFINES
    assert f'-DSPARSEINFER_OP_TYPE="{op_library.OP_TYPE}"' in op_library.DEFINES
    native = [p for p in op_library.NATIVE_DIR.iterdir() if p.suffix in (".cc", ".h", ".cu")]
    assert native and not [p.name for p in native if f'"{op_library.DOMAIN}"' in p.read_text()
                           or f'"{op_library.OP_TYPE}"' in p.read_text()]
    assert any("SPARSEINFER_OP_DOMAIN" in p.read_text() for p in native)
