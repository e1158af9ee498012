"""Shared fixtures: a tiny world and a tiny end-to-end run, built once per test session."""

import dataclasses

import pytest
import torch

from llmlab import presets

torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> str:
    from llmlab.stages import world

    cfg = dataclasses.replace(presets.tiny().world, out_dir=str(tmp_path_factory.mktemp("world") / "world"))
    world.main(cfg)
    return cfg.out_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, results) of `speedrun` on the tiny preset in a temporary run directory."""
    from llmlab.stages import speedrun

    cfg = presets.tiny(str(tmp_path_factory.mktemp("runs") / "tiny"))
    return cfg, speedrun.main(cfg)
