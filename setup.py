"""Build hook only (the metadata is in pyproject.toml): ship the repository's conf/ inside the wheel as carlos_ray/conf,
so configs and prompt sets named `conf/...` resolve in a plain `pip install .` (see carlos_ray/paths.py)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "conf"
        if src.is_dir():
            shutil.copytree(src, Path(self.build_lib) / "carlos_ray" / "conf", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConf})
