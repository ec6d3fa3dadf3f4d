"""Test set-up: fake 8 CPU devices before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ahead-of-time TPU compiles (libtpu, no TPU): no metadata server here, and the two xdist workers
# may both load libtpu, whose lock file would otherwise refuse the second.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; skips the test with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}; real third-party assets unavailable")
    return SHARED_DATA


@pytest.fixture(scope="session")
def load_config():
    """The one way tests load a run config: `load_config("configs/gemma.py[:ARG]")` parses it as
    `python -m haf_jax.train --config=...` does (ml_collections' config_flags, the file loaded by
    path, locked), from any working directory; a relative path is taken from the repository root."""
    from absl import flags
    from ml_collections import config_flags

    def load(spec: str):
        path, colon, arg = str(spec).partition(":")
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
        fv(["prog", f"--config={REPO / path}{colon}{arg}"])
        return fv.config

    return load


def pytest_collection_modifyitems(config, items):
    """The offline-default run takes minutes: start it first so that, under pytest-xdist, the
    other worker runs the rest of the suite meanwhile instead of waiting on it at the end."""
    items.sort(key=lambda item: 0 if item.name == "test_offline_default_run" else 1)
