"""Test set-up: fake 8 CPU devices before jax is imported anywhere; fixtures shared by tests/unit and
tests/e2e (helpers without fixtures live in tests/helpers/, importable as `helpers` since pytest puts
this directory on sys.path)."""

import atexit
import os
import pathlib
import shutil
import socket
import tempfile

import pytest

# XLA's backend at optimisation level 0 in the test processes: most of their time is compiling tiny
# models, which this makes cheaper (the seven heaviest unit modules: 232 s -> 168 s on 2 workers),
# while their programs run a little slower. The children the tests start (helpers.runs.child_env) and
# the README's run (tests/e2e/test_e2e_default.py) drop it: they run what they compile, many steps.
# Numbers compared across the two (a child's run and an in-process one) are compared to float rounding.
TEST_PROCESS_XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_PROCESS_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ahead-of-time TPU compiles (libtpu, no TPU): no metadata server here, and the two xdist workers
# may both load libtpu, whose lock file would otherwise refuse the second.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# One persistent JAX compilation cache for the whole session: this process, its pytest-xdist workers
# (started after this file is imported, they inherit the environment) and the children the tests
# start (helpers.runs.child_env). Many tests compile programs another test, worker or child already
# compiled (the tiny presets' steps, scorers and samplers); they load the executable instead, which is
# the one a compile gives, so no number changes. Measured here: the seven heaviest unit modules took
# 201 s instead of 276 s on 2 workers from an empty cache. The process that makes the directory
# removes it at exit; tests/e2e/test_e2e_default.py clears these variables for the README's run.
if "HAF_JAX_TEST_COMPILE_CACHE" not in os.environ:
    _compile_cache = tempfile.mkdtemp(prefix="haf_jax_test_compile_cache_")
    atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)
    os.environ.update(
        HAF_JAX_TEST_COMPILE_CACHE=_compile_cache,
        JAX_COMPILATION_CACHE_DIR=_compile_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data; skips the test with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}; real third-party assets unavailable")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tok():
    """The bundled 2,048-token tokenizer (haf_jax/samples), loaded once per session."""
    from haf_jax.data import load_tokenizer, sample_paths

    return load_tokenizer(sample_paths()["tokenizer"])


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """A directory holding local copies of the repositories in helpers.hub_repos.ROWS (hub layout)."""
    from helpers.hub_repos import write_hub

    return write_hub(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module (restored after): the parity models are tiny, and on
    2 shared cores torch's own pool only contends with XLA and the other xdist worker (a 59-step
    greedy loop took 10-20 s instead of 0.2 s; `generate` ran 3-10x slower). Modules that use torch
    mark themselves `pytestmark = pytest.mark.usefixtures("one_torch_thread")`; without torch it
    does nothing (the tests that need torch import or skip it themselves)."""
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is refused and recorded: reading a local repository makes none."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no network ({address!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield
    assert not attempts, f"network connections attempted: {attempts}"


@pytest.fixture
def one_device(monkeypatch, tmp_path):
    """This process seen as a one-device machine for an in-process run (this file fakes 8 CPU devices;
    the mesh of a run, a scorer or a sampler takes every device jax.devices() lists, and a child
    process started by a test gets one): in-process commands and library calls run on one device as
    a child would, with their own reference cache (HAF_JAX_CACHE), as helpers.runs.Runner gives a
    child. Their numbers equal a child's to float rounding, not bit for bit (XLA still has 8 devices
    here): compare bit for bit only runs made the same way."""
    from helpers.runs import restrict_to_one_device

    return restrict_to_one_device(monkeypatch, tmp_path / "haf_jax_cache")


@pytest.fixture(scope="session")
def load_config():
    """The one way tests load a run config (helpers.runs.load_config, as `python -m haf_jax.train`
    parses it): `load_config("configs/gemma.py[:ARG]", "--config.KEY=VALUE", ...)`; a relative path
    is taken from the repository root."""
    from helpers.runs import load_config as load

    return lambda spec, *overrides: load(str(REPO / spec), *overrides)


# The longest single tests outside tests/e2e (seconds on one worker of the 2-core machine, from
# `--durations=0`): queued right after the end-to-end tests rather than where their module sorts
# (tpu_aot sorted last). Work stealing splits the queue in two contiguous halves, so they end the
# first worker's half, the part the other worker steals from once its own half is done.
LONG_UNIT_TESTS = (
    "test_tpu_aot.py::test_haf_step_state_is_sharded_like_the_parameters_on_v5e_8",  # 58
    "test_evaluate.py::test_loop_score_and_evaluate_agree_and_evaluate_writes_its_report",  # 27
    "test_scan.py::test_three_train_steps_equal_and_a_per_layer_state_resumes_scanned",  # 22
    "test_step.py::test_bf16_compute_with_remat_tracks_float32",  # 21
    "test_plan.py::test_state_is_sharded_over_v5e_2x4",  # 18
)


def pytest_configure(config):
    """Under pytest-xdist, work stealing instead of plain load balancing: an idle worker takes half of
    the other's queued tests, where `load` leaves the tests first handed to the worker that runs the
    README default run (minutes) queued behind it."""
    if config.pluginmanager.hasplugin("xdist") and getattr(config.option, "dist", "no") == "load":
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config, items):
    """The offline-default run takes minutes: start it first so that, under pytest-xdist, the
    other worker runs the rest of the suite meanwhile instead of waiting on it at the end. Then the
    end-to-end tests, LONG_UNIT_TESTS, and the other unit tests, each in collection order."""

    def rank(item):
        if item.name == "test_offline_default_run":
            return 0
        if "/e2e/" in item.nodeid:
            return 1
        return 2 if item.nodeid.split("/")[-1] in LONG_UNIT_TESTS else 3

    items.sort(key=rank)
