"""The repository root *is* the qconv package (cli.py, convert/, pipelines/, runtime/): every folder with an
__init__.py below it is a subpackage, found here rather than listed, so a new one cannot be left out of the wheel.
tests/ and bench/ are not part of it. Everything else lives in setup.cfg."""
from setuptools import find_packages, setup

setup(packages=["qconv"] + [f"qconv.{p}" for p in find_packages(exclude=["tests", "tests.*", "bench", "bench.*"])])
