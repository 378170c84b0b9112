"""Build hook: the pretrained weights live once in the repository, in ``bundle/models/`` (what the bundle's configs
load); a wheel gets them as package data in ``noder_monai/model/weights/`` so a non-editable install finds them
too (``noder_monai.model.default_autoencoder_path``). All other settings are in setup.cfg."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).resolve().parent / "bundle" / "models"
WEIGHT_FILES = ("model.pt", "model_2d.pt")


class BuildPyWithWeights(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "noder_monai" / "model" / "weights"
        target.mkdir(parents=True, exist_ok=True)
        for name in WEIGHT_FILES:
            shutil.copy2(MODELS / name, target / name)


setup(cmdclass={"build_py": BuildPyWithWeights})
