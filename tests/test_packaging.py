"""An installed wheel carries the configs and finds them from any working directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_config_and_the_installed_package_finds_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("cnnlab-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("cnnlab/configs/")}
    expected = {f"cnnlab/configs/{path.relative_to(ROOT / 'configs').as_posix()}" for path in (ROOT / "configs").rglob("*.yaml")}
    assert expected and expected <= shipped

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}  # the wheel's copy comes first on the path
    found = subprocess.run([sys.executable, "-c", "import cnnlab.config as c; print(c.__file__); print(c.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert found[0].startswith(str(target)) and found[1] == str(target / "cnnlab" / "configs")
    result = subprocess.run([sys.executable, "-m", "cnnlab", "train", "activation=selu", "--cfg", "job"],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "name: selu" in result.stdout
