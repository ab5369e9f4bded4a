"""runs/setup_env.sh decides which Python and which torch build to install, on a stub PATH:
fake python3 / venv python / nvidia-smi scripts log what they are asked to do, so every branch
runs in milliseconds without installing anything."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "runs" / "setup_env.sh"

# The venv's python: `-c "import torch"` fails unless TORCH_INSTALLED; pip with the CPU index
# fails when CPU_INDEX_DOWN; everything else succeeds. Every call is logged.
VENV_PYTHON = """#!/bin/bash
echo "venv-python $*" >> "$SETUP_LOG"
if [ "$1" = "-c" ]; then [ -n "${TORCH_INSTALLED:-}" ]; exit $?; fi
case "$*" in *--index-url*) [ -z "${CPU_INDEX_DOWN:-}" ]; exit $?;; esac
exit 0
"""

# A stock python3: `-m venv DIR` makes DIR/bin/python (the stub above) and an activate script,
# or fails like Debian's python3 without python3-venv when NO_ENSUREPIP is set.
SYSTEM_PYTHON3 = """#!/bin/bash
echo "python3 $*" >> "$SETUP_LOG"
if [ "$1 $2" = "-m venv" ]; then
    if [ -n "${NO_ENSUREPIP:-}" ]; then echo "The virtual environment was not created: ensurepip is not available" >&2; exit 1; fi
    mkdir -p "$3/bin"
    cp "$STUBS/venv-python" "$3/bin/python"
    printf 'export VIRTUAL_ENV="%s"\\nexport PATH="%s/bin:$PATH"\\n' "$PWD/$3" "$PWD/$3" > "$3/bin/activate"
    exit 0
fi
exit 0
"""


def write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def stub_env(tmp_path):
    if shutil.which("nvidia-smi", path="/usr/bin:/bin"):
        pytest.skip("a real nvidia-smi on /usr/bin would take part in the decision")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    write_exe(stubs / "python3", SYSTEM_PYTHON3)
    write_exe(stubs / "venv-python", VENV_PYTHON)
    project = tmp_path / "project"
    project.mkdir()
    log = tmp_path / "log"

    def run(gpu=False, **env):
        if gpu:
            write_exe(stubs / "nvidia-smi", "#!/bin/bash\necho 'GPU 0: NVIDIA H100'\n")
        # a stock shell: only the stubs and /usr/bin:/bin, no venv, no conda, no `python`
        base = {"HOME": str(tmp_path), "PATH": f"{stubs}:/usr/bin:/bin", "SETUP_LOG": str(log), "STUBS": str(stubs)}
        r = subprocess.run(["bash", str(SETUP)], cwd=project, capture_output=True, text=True, timeout=30,
                           env={**base, **env})
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return r, calls

    run.project = project
    return run


def test_stock_machine_creates_and_uses_a_project_venv_with_cpu_torch(stub_env):
    r, calls = stub_env()
    assert r.returncode == 0, r.stderr
    assert calls[0] == "python3 -m venv .venv"
    assert (stub_env.project / ".venv" / "bin" / "python").exists()
    assert not any(c.startswith("python3 -m pip") for c in calls)  # nothing goes to the system python
    installs = [c for c in calls if " pip install" in c]
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in installs[0]
    assert installs[1] == "venv-python -m pip install -q -e ."
    assert "using .venv" in r.stdout
    # a second run reuses the venv
    r, calls = stub_env(TORCH_INSTALLED="1")
    assert r.returncode == 0 and not any("venv" in c.split()[0] and "-m venv" in c for c in calls)
    assert calls == ['venv-python -c import torch', 'venv-python -m pip install -q -e .']


def test_missing_venv_module_is_one_clear_line(stub_env):
    r, calls = stub_env(NO_ENSUREPIP="1")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "apt-get install python3-venv" in r.stderr
    assert not (stub_env.project / ".venv").exists()


def test_active_virtual_env_is_respected(stub_env, tmp_path):
    env_bin = tmp_path / "myenv" / "bin"
    env_bin.mkdir(parents=True)
    shutil.copy(tmp_path / "stubs" / "venv-python", env_bin / "python")
    r, calls = stub_env(VIRTUAL_ENV=str(tmp_path / "myenv"), PATH=f"{env_bin}:{tmp_path / 'stubs'}:/usr/bin:/bin",
                        TORCH_INSTALLED="1", EXTRAS="[dev]")
    assert r.returncode == 0, r.stderr
    assert not (stub_env.project / ".venv").exists() and "python3 -m venv .venv" not in calls
    assert calls == ['venv-python -c import torch', 'venv-python -m pip install -q -e .[dev]']


def test_gpu_machine_gets_the_default_index_and_cpu_index_falls_back(stub_env):
    r, calls = stub_env(gpu=True)
    assert r.returncode == 0, r.stderr
    assert "venv-python -m pip install -q torch==2.13.0" in calls
    assert not any("--index-url" in c for c in calls)
    (stub_env.project / "../stubs/nvidia-smi").unlink()
    r, calls = stub_env(CPU_INDEX_DOWN="1")
    assert r.returncode == 0, r.stderr
    torch_installs = [c for c in calls if "torch==" in c]
    assert len(torch_installs) == 2 and "--index-url" in torch_installs[0]
    assert torch_installs[1] == "venv-python -m pip install -q torch==2.13.0"
    assert "unreachable" in r.stdout


def test_torch_spec_and_installed_torch_win(stub_env):
    r, calls = stub_env(TORCH_SPEC="torch==2.9.1")
    assert [c for c in calls if "torch" in c and "pip" in c] == ["venv-python -m pip install -q torch==2.9.1"]
    r, calls = stub_env(TORCH_INSTALLED="1", TORCH_SPEC="torch==2.9.1")
    assert not any("torch==" in c for c in calls)
