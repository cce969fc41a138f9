"""Install the FakeReasoning pipeline packages (pipeline, modeling, sharding).

Metadata and dependencies live in setup.cfg; this file exists so that
``pip install -e .`` works with older tooling too.
"""
from setuptools import setup

setup()
