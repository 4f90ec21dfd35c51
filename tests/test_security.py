"""Safe loading and credentials: no unrestricted unpickling, no credentials in configs, logs or URLs
printed, servers in docs and tests on 127.0.0.1.

What ruff can check is its lint rules (pyproject.toml): S301/S302 (pickle, dill, marshal loads),
S104 (binding to all interfaces in Python); the scans here are what it cannot express.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from conftest import ROOT
from jobkit import run_cli

pytestmark = pytest.mark.reliability


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def test_no_file_is_unpickled_without_restriction():
    """Checkpoints are safetensors; resume states go through torch.load(weights_only=True); no pickle."""
    offences = []
    for path in sorted((ROOT / "src" / "vitplasticity").rglob("*.py")):
        for call, name, keywords in _calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
            weights_only = keywords.get("weights_only")
            if name == "torch.load" and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                offences.append(f"{where} without weights_only=True")
            if re.fullmatch(r"(joblib|cloudpickle)\.loads?", name):  # pickle, dill, marshal: ruff S301, S302
                offences.append(where)
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                offences.append(f"{where} with allow_pickle")
    assert offences == []
    source = (ROOT / "src" / "vitplasticity" / "models.py").read_text()
    assert "from safetensors.torch import load_file" in source


CREDENTIAL_KEY = re.compile(r"(password|passwd|secret|token|api_?key|access_?key)\s*:\s*['\"]?[^\s'\"#]+", re.I)
URL_USERINFO = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)


def test_shipped_configs_hold_no_credentials():
    files = [*ROOT.glob("config/*.yaml"), *ROOT.glob("tests/data/*.yaml"), *ROOT.glob("workflow/profiles/*/*.yaml"),
             *ROOT.glob("dvc.yaml"), *ROOT.glob(".dvc/config")]
    assert files
    offences = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in files
                for pattern in (CREDENTIAL_KEY, URL_USERINFO) for match in pattern.finditer(path.read_text())]
    assert offences == []


def test_a_credential_in_a_download_url_is_never_printed(tmp_path, capsys):
    data = {"source": "cifar10", "store_size": 32, "split_seed": 0, "val_fraction": 0.2,
            "url": "http://reader:s3cr3t-Passw0rd@127.0.0.1:9/cifar-10-python.tar.gz",
            "checksum": "md5:c58f30108f718f92721af3b95e74349a"}
    code, lines = run_cli(capsys, ["prepare", "--settings", json.dumps({"name": "cifar10", "data": data}),
                                   "--out", str(tmp_path / "prepared"), "--raw", str(tmp_path / "raw")])
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("vitplasticity prepare: error: task cifar10: cannot download cifar-10-python.tar.gz "
                               "from http://127.0.0.1:9/cifar-10-python")
    assert "s3cr3t" not in lines[0] and "reader" not in lines[0]
    assert not (tmp_path / "prepared").exists()


# `--host X`, `--bind-address=X`, `"--host", "X"`; and ("X", port) given to a socket or server.
HOST_OPTION = re.compile(r"--(?:bind-address|host|bind)(?:=|['\"]?,?\s+['\"]?)([^\s'\",)]+)")
SERVER_CALL = re.compile(r"\bbind\(|Server\(|create_server\(|__init__\(\(")
SOCKET_ADDRESS = re.compile(r"\(\s*['\"]([^'\"]*)['\"]\s*,\s*(?:\d+|port)\s*\)")


def test_servers_in_docs_and_tests_listen_on_127_0_0_1_only():
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("scripts/**/*.sh"),
             *ROOT.glob("tests/**/*.py"), *ROOT.glob("tests/**/*.sh"), *ROOT.glob(".ci/**/*.sh")]
    offences = []
    for path in files:
        if path.resolve() == Path(__file__).resolve() or not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            hosts = HOST_OPTION.findall(line) + (SOCKET_ADDRESS.findall(line) if SERVER_CALL.search(line) else [])
            if "0.0.0.0" in line or any(host != "127.0.0.1" for host in hosts):  # noqa: S104 (the scan's needle)
                offences.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offences == []
