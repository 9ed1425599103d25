"""Fixtures of the deployment tests (compose manifests, Dockerfiles, the Triton model repository).

They need nothing beyond the root ``conftest.py`` (the tiny model, private Redis servers): each
file starts its own servers (the compose teacher, ``tritonserver``), which no other file uses.
"""
