"""Shared fixtures: a tiny synthetic dataset (generated once per session), the CLI as a subprocess, and
in-process Hydra composition of ``conf/train.yaml``."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

import vss.config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 420

# The tiny run of every CLI test is the one users type: `python -m vss.train debug=tiny` (conf/debug/tiny.yaml:
# 2+2 synthetic videos of 18 frames at 32x32, 4 steps, validation every 2 steps), with a small SegFormer decoder.
TINY_RUN = ("debug=tiny", "model.embed_dim=32")
# The tiny synthetic set's generator knobs alone (tests that compose other sizes, and make_data_dir's key)
TINY_DATA = tuple(
    f"++data.synthetic.{k}={v}"  # ++: set whether or not conf/data/synthetic.yaml lists the knob
    for k, v in OmegaConf.load(vss.config.CONF_DIR / "debug" / "tiny.yaml").data.synthetic.items()
)


def compose_train(overrides: Iterable[str] = ()) -> DictConfig:
    """``conf/train.yaml`` composed in-process with ``overrides`` (hydra config included)."""
    vss.config.register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def cli_command(args: Sequence[str]) -> list[str]:
    """``python -m vss.train`` with ``args``; flags (``-m``) go first, as Hydra's argument parser needs."""
    flags = [a for a in args if a.startswith("-")]
    return [sys.executable, "-m", "vss.train", *flags, *(a for a in args if not a.startswith("-"))]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """In-process tests run single-threaded: tiny models run faster and steadier so on a 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _logging_as_before() -> Iterator[None]:
    """Undo the logging set-up of an entry point run in-process (Hydra's job logging: a console handler bound to
    this test's captured stdout, closed once the test ends, and a file handler): a later log record would write to a
    closed stream. Pytest's own capture handlers are left alone."""
    import logging

    def loggers() -> dict[str, logging.Logger]:
        known = logging.Logger.manager.loggerDict.items()
        return {"": logging.getLogger(), **{n: lg for n, lg in known if isinstance(lg, logging.Logger)}}

    before = {name: (lg.level, list(lg.handlers)) for name, lg in loggers().items()}
    yield
    for name, lg in loggers().items():
        level, handlers = before.get(name, (logging.NOTSET, []))
        for handler in [h for h in lg.handlers if h not in handlers and type(h).__module__ == "logging"]:
            lg.removeHandler(handler)
            handler.close()
        lg.setLevel(level)


def compose_job(overrides: Iterable[str] = ()) -> DictConfig:
    """:func:`compose_train` without its ``hydra`` node, as a job's stored config (Hydra cleared after)."""
    cfg = compose_train(overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def compose_cfg() -> Iterator[Callable[..., DictConfig]]:
    """:func:`compose_train` as a fixture: ``compose_cfg("data=vspw", ...)``."""
    yield lambda *overrides: compose_train(overrides)
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_bench() -> Iterator[Callable[..., DictConfig]]:
    """``compose_bench(*overrides)``: ``conf/bench.yaml`` composed in-process (Hydra cleared before each, as a test
    may compose conf/train.yaml in between)."""
    vss.config.register_resolvers()

    def compose_bench(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(vss.config.CONF_DIR), version_base="1.3"):
            return compose("bench", overrides=list(overrides))

    yield compose_bench
    GlobalHydra.instance().clear()


def bench_numbers(line: str) -> dict[str, float]:
    """The ``key value`` figures of a ``[vss.bench] ...: k v | k v`` row."""
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)", line.split("): ", 1)[1])}


@pytest.fixture(scope="session")
def make_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_data_dir(*knob_overrides)``: a ``paths.data_dir`` holding the synthetic dataset for those
    ``data.synthetic.*`` overrides, generated once per session (cached by overrides)."""
    from vss.data.synthetic import ensure_synthetic

    made: dict[tuple[str, ...], Path] = {}

    def make(*knobs: str) -> Path:
        if knobs not in made:
            data_dir = tmp_path_factory.mktemp("vss-data")
            cfg = compose_train([*knobs, f"paths.data_dir={data_dir}"])
            ensure_synthetic(cfg.data.root, progress=False, **cfg.data.synthetic)
            GlobalHydra.instance().clear()
            made[knobs] = data_dir
        return made[knobs]

    return make


@pytest.fixture(scope="session")
def tiny_data_dir(make_data_dir: Callable[..., Path]) -> Path:
    """``paths.data_dir`` of the tiny synthetic dataset shared by the CLI tests."""
    return make_data_dir(*TINY_DATA)


@pytest.fixture(scope="session")
def tiny_args(tiny_data_dir: Path) -> Callable[[Path], list[str]]:
    """``tiny_args(log_dir)``: overrides that make the default job tiny (4 steps, validation every 2 steps)
    on the shared tiny dataset, logging under ``log_dir``."""
    return lambda log_dir: [*TINY_RUN, f"paths.data_dir={tiny_data_dir}", f"paths.log_dir={log_dir}"]


@pytest.fixture
def tiny_overrides(tiny_args: Callable[[Path], list[str]], tmp_path: Path) -> list[str]:
    """:func:`tiny_args` logging under ``tmp_path / "logs"``."""
    return tiny_args(tmp_path / "logs")


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment of a CLI subprocess: W&B offline with every W&B folder in a temp dir, no network checks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "VSS_"))}
    home = tmp_path_factory.mktemp("wandb-home")
    for sub in ("dir", "cache", "config", "data", "artifacts"):
        (home / sub).mkdir()
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(home / "dir"),
        WANDB_CACHE_DIR=str(home / "cache"),
        WANDB_CONFIG_DIR=str(home / "config"),
        WANDB_DATA_DIR=str(home / "data"),
        WANDB_ARTIFACT_DIR=str(home / "artifacts"),
        NO_ALBUMENTATIONS_UPDATE="1",
        HYDRA_FULL_ERROR="1",
        OMP_NUM_THREADS="1",  # two processes at a time (concurrent runs, DDP) on a 2-core box
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args, timeout=...)``: run ``python -m vss.train *args`` from the repo root, wait, and return
    the completed process (text stdout/stderr); fails the test if it runs past ``timeout``."""

    def run(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        cmd = cli_command(args)
        try:
            return subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
            pytest.fail(f"{' '.join(cmd)} ran past {timeout} s\n{out[-4000:]}\n{err[-4000:]}")

    return run


@pytest.fixture(scope="session")
def five_step_run(
    run_cli: Callable[..., subprocess.CompletedProcess],
    tiny_args: Callable[[Path], list[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> subprocess.CompletedProcess:
    """The tiny job with ``trainer.max_steps=5`` (validation every 2 steps: steps 2, 4 and the final 5), run once per
    session; a test that resumes it works on a copy of its run directory."""
    return run_cli(*tiny_args(tmp_path_factory.mktemp("five") / "logs"), "trainer.max_steps=5")


@pytest.fixture(scope="session")
def start_cli(cli_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen]]:
    """``start_cli(*args)``: start ``python -m vss.train *args`` without waiting (text pipes)."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            cli_command(args), cwd=REPO_ROOT, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:  # only processes started here, left running by a failed test
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def collect() -> ModuleType:
    """``experiments/collect.py`` imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("collect", REPO_ROOT / "experiments" / "collect.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["collect"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
