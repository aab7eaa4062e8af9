"""The commands pyproject.toml installs (scripts/setup.sh puts them in .venv/bin), as a newcomer runs them."""

import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts.demo import write_researcher_config
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
# The original PyTaskManager's paths and this checkout's own: each must run as a plain script.
# Spelled in two pieces, so that this file does not find itself.
SYS_PATH_EDIT = "sys.path" + ".insert(0, str("
SCRIPTS = ["master/TaskMaster.py", "client/runScript.py", "fileservice/FileService.py", "client/FileService.py"]


@pytest.mark.parametrize("command", ["pht", "pht-registry", "pht-site", "pht-fileservice"])
def test_each_role_has_its_command(command):
    done = subprocess.run([BIN / command, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(("Usage: " + command, "usage: " + command))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_run_from_anywhere_without_touching_sys_path(script, tmp_path):
    done = subprocess.run([sys.executable, ROOT / script, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert SYS_PATH_EDIT not in (ROOT / script).read_text()


def test_no_module_of_the_checkout_edits_sys_path():
    edited = [path.relative_to(ROOT).as_posix() for folder in ("master", "client", "fileservice", "researcher",
                                                                "common", "scripts", "bench", "examples", "tests")
              for path in (ROOT / folder).rglob("*.py") if SYS_PATH_EDIT in path.read_text()]
    assert edited == []


def test_pht_reads_the_config_the_demo_leaves_for_its_registry(served_app, make_researcher, make_site, tmp_path):
    make_site("hospital-a")
    token = make_researcher()["Authorization"].removeprefix("Bearer ")
    federation = SimpleNamespace(registry_url=served_app, researcher_token=token)
    config = write_researcher_config(federation, tmp_path / "demo" / "researcher.toml")
    assert stat.S_IMODE(config.stat().st_mode) == 0o600

    environment = {name: value for name, value in os.environ.items() if not name.startswith("PHT_")}
    done = subprocess.run([BIN / "pht", "--config", config, "sites"], capture_output=True, text=True, timeout=60,
                          env=environment, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "hospital-a" in done.stdout
