"""The package installs (`pip install -e .` into a fresh virtual environment) and its commands then run from any
directory. The environment borrows this interpreter's installed dependencies through a .pth file and installs only
the project (--no-deps, offline), which takes seconds; `make install-check` does the same with a training step."""
import os
import subprocess
import sys
import sysconfig

from tests.helpers import ROOT


def _venv(path):
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
  python = os.path.join(path, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                        capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, "_deps.pth"), "w") as f:       # the dependencies this test suite runs on
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  return python


def test_pip_install_editable_then_commands_run_from_another_directory(tmp_path):
  python = _venv(tmp_path / "venv")
  r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                      ROOT], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([python, "-c", "import dino_jax, configs.common, importlib.metadata as m; print(dino_jax.__file__);"
                      "print(sorted(set(m.metadata('dino_jax').get_all('Provides-Extra'))))"],
                     cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.splitlines()[0] == os.path.join(ROOT, "dino_jax", "__init__.py")
  assert r.stdout.splitlines()[1] == str(["cuda12", "cuda13", "dev", "slurm", "wandb"])
  # The training command from another directory: the recipe file imports configs.common from the installed package;
  # the config check then refuses the missing dataset before anything is built (a whole run is `make install-check`).
  missing = tmp_path / "no_such_dir"
  r = subprocess.run([python, "-m", "dino_jax.train", f"--config={ROOT}/configs/quickstart.py",
                      f"--workdir={tmp_path}/run", f"--config.data.source=imagefolder:{missing}"],
                     cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1 and str(missing) in r.stderr and "No module named" not in r.stderr, r.stderr[-3000:]
