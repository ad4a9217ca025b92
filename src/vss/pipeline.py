"""Multi-stage training: ``python -m vss.pipeline experiment=NAME [key=value ...] [pipeline_dir=DIR]``.

An experiment that lists ``pipeline`` stages (e.g. ``conf/experiment/stf_mar_synthetic.yaml``) runs them in
order, each in its own directory under the pipeline directory:

- a **training stage** (``train: [overrides]``) is ``python -m vss.train experiment=NAME <its overrides> <the
  command line's overrides>``: its own run directory, checkpoints, ``train.log`` and ``metrics.json``;
- a **pass** (``run: {_target_: module.function, ...}``) calls a function between training stages with
  ``output_dir=`` its directory; the function returns the path of what it made (e.g. STF+MAR's ``memory.pt``).

``{name}`` in a stage's overrides or arguments is what the earlier stage ``name`` produced: a training stage's
best checkpoint (from its ``metrics.json``), or its final ``last.ckpt`` when no validation during training chose
one; a pass's returned path. The command line's overrides go to every training stage after the stage's own (they
win: ``python -m vss.pipeline experiment=stf_mar_synthetic trainer.max_steps=20`` shortens every stage to 20
steps, each ending with a validation and ``last.ckpt`` of its final weights).

A stage is done when its ``stage.json`` names a product that exists: the pipeline writes it only after checking
the checkpoint (or the pass's file) is there, and skips a done stage when the same command runs again with
``pipeline_dir=DIR``. A training stage that was interrupted resumes from its ``checkpoints/last.ckpt``; one that
left no checkpoint trains again (the earlier attempt's files moved to ``NAME.earlier-K``). At the end
``pipeline.json`` and ``pipeline.md`` list every training stage's metrics with its total steps: its own plus
those of the stage whose checkpoint it started from (``init_from={name}``).

One process at a time: the pipeline holds ``DIR/vss.lock`` (a second ``vss.pipeline`` on the same directory is
refused, naming the holder's PID), and each stage's ``vss.train`` holds its run directory's. A stage runs in its
own process group, tied to the pipeline: SIGTERM, SIGINT (Ctrl-C) or SIGHUP of the pipeline sends the stage's
process SIGTERM (``vss.train`` saves ``last.ckpt`` and ends; a second signal, or 120 s, kills its whole group), and
the pipeline's own death, even by SIGKILL, sends it SIGTERM too.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vss.cli import check_command_line
from vss.errors import ConfigError, friendly_errors, print_error
from vss.locks import DirectoryLock
from vss.validation import PIPELINE_STAGE_ENV

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
STAGE_FILE = "stage.json"
SUMMARY_METRICS = ("mIoU", "fwIoU", "mVC8", "mVC16")
OWN_KEYS = ("pipeline_dir",)
"""Command-line keys the pipeline consumes itself (not passed to the stages)."""
STOP_GRACE_S = 120.0
"""How long a stage's process may take to save ``last.ckpt`` and end after the pipeline is stopped."""
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Stage:
    """One stage of a pipeline: a training run (``train`` overrides) or a pass (``run``: a ``_target_`` call)."""

    name: str
    train: list[str] | None = None
    run: dict[str, Any] | None = None
    label: str = ""
    needs: list[str] = field(default_factory=list)

    @property
    def parent(self) -> str | None:
        """The stage whose checkpoint this training stage starts from (``init_from={name}``), if any."""
        for o in self.train or []:
            m = re.fullmatch(r"\+?init_from=\{([A-Za-z_][A-Za-z0-9_]*)\}", o)
            if m:
                return m[1]
        return None


def _placeholders(value: Any) -> list[str]:
    if isinstance(value, str):
        return PLACEHOLDER.findall(value)
    if isinstance(value, Mapping):
        return [n for v in value.values() for n in _placeholders(v)]
    if isinstance(value, Sequence):
        return [n for v in value for n in _placeholders(v)]
    return []


def _fill(value: Any, products: Mapping[str, str]) -> Any:
    """``value`` with every ``{name}`` replaced by stage ``name``'s product."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: products[m[1]], value)
    if isinstance(value, Mapping):
        return {k: _fill(v, products) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_fill(v, products) for v in value]
    return value


def parse_stages(spec: Any) -> list[Stage]:
    """The ``pipeline`` list of a config, checked: unique names, one of ``train`` / ``run``, known references."""
    if not isinstance(spec, Sequence) or isinstance(spec, str) or not spec:
        raise ConfigError("pipeline is empty: the experiment lists no stages (e.g. experiment=stf_mar_synthetic)")
    stages: list[Stage] = []
    for i, item in enumerate(spec):
        where = f"pipeline[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where} is invalid: expected a mapping with name and train or run, got {item!r}")
        unknown = set(item) - {"name", "train", "run", "label"}
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {sorted(unknown)}: expected name, train or run, label")
        name = item.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{where}.name={name!r} is invalid: expected an identifier (letters, digits, _)")
        if any(s.name == name for s in stages):
            raise ConfigError(f"{where}.name={name!r} is repeated: stage names must be unique")
        train, run = item.get("train"), item.get("run")
        if (train is None) == (run is None):
            raise ConfigError(f"{where} ({name}) is invalid: give exactly one of train (overrides) or run (a pass)")
        if train is not None and (isinstance(train, str) or not all(isinstance(o, str) for o in train)):
            raise ConfigError(f"{where}.train is invalid: expected a list of override strings, got {train!r}")
        if run is not None and not (isinstance(run, Mapping) and isinstance(run.get("_target_"), str)):
            raise ConfigError(f"{where}.run is invalid: expected a mapping with _target_ (a function), got {run!r}")
        stage = Stage(name, list(train) if train is not None else None, dict(run) if run is not None else None)
        stage.label = str(item.get("label") or name)
        stage.needs = _placeholders(stage.train if train is not None else stage.run)
        earlier = [s.name for s in stages]
        for need in stage.needs:
            if need not in earlier:
                raise ConfigError(
                    f"{where} ({name}) refers to {{{need}}}, which is not an earlier stage (earlier: {earlier})"
                )
        stages.append(stage)
    return stages


def split_arguments(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The Hydra overrides for the stages, and the pipeline's own ``key=value`` arguments."""
    overrides, own = [], {}
    for a in argv:
        key = a.split("=", 1)[0]
        if key in OWN_KEYS:
            own[key] = a.split("=", 1)[1] if "=" in a else ""
        elif a in ("-m", "--multirun"):
            raise ConfigError("vss.pipeline runs one pipeline: -m / --multirun is not supported (sweep the stages)")
        else:
            overrides.append(a)
    return overrides, own


def compose_stages(overrides: Sequence[str]) -> tuple[list[Stage], str]:
    """The pipeline of the training config composed with ``overrides``, and the experiment's name."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from vss.config import CONF_DIR, register_resolvers

    check_command_line("train", overrides)
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    experiment = cfg.hydra.runtime.choices.get("experiment") or "pipeline"
    GlobalHydra.instance().clear()
    # resolved: a pass may read the composed config (e.g. data: {scale: ${data.scale}}); {name} is not OmegaConf
    return parse_stages(OmegaConf.to_container(cfg.get("pipeline"), resolve=True)), str(experiment)


def check_stage_configs(stages: Sequence[Stage], user: Sequence[str]) -> None:
    """Compose and check every training stage's config before the first one runs (an error in the last stage
    must not wait for the first to train); the earlier stages' products stand in as ``/pending/<name>``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vss.config import CONF_DIR, register_resolvers
    from vss.validation import check_model_values, check_train_values

    pending = {s.name: f"/pending/{s.name}" for s in stages}
    register_resolvers()
    for stage in stages:
        if stage.train is None:
            continue
        overrides = [*_fill(stage.train, pending), *user]
        try:
            check_command_line("train", overrides)
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
            check_train_values(cfg)
            check_model_values(cfg)
        except ConfigError as e:
            raise ConfigError(f"stage {stage.name}: {e}") from None
        finally:
            GlobalHydra.instance().clear()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file, or None when it is absent."""
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Write atomically (a crash never leaves a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def say(message: str) -> None:
    """Print a ``[vss.pipeline]`` line."""
    print(f"[vss.pipeline] {message}", flush=True)


class StageFailed(RuntimeError):
    """A stage's process failed; carries its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Interrupted(BaseException):
    """The pipeline got a stop signal (a BaseException, as KeyboardInterrupt: no ``except Exception`` keeps it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` in the pipeline (the stage's process is then stopped
    by :func:`run_stage_process`); the previous handlers come back afterwards."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {name: signal.signal(getattr(signal, name), handler) for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the pipeline dies, however it dies (Linux's
    ``PR_SET_PDEATHSIG``); it ends at once when the pipeline is already gone."""
    parent = os.getpid()
    prctl = getattr(ctypes.CDLL(None), "prctl", None) if sys.platform.startswith("linux") else None

    def setup() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:
            os._exit(143)

    return setup


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def stop_process_group(proc: subprocess.Popen, grace_s: float | None = None) -> None:
    """End a stage's process and its process group: SIGTERM to the process (``vss.train`` saves ``last.ckpt`` and
    exits; its data-loader workers are its to stop: a signal to them would break that save), then SIGKILL to the
    group after ``grace_s`` seconds (:data:`STOP_GRACE_S`) or at a second stop signal; no member outlives it."""
    with suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S if grace_s is None else grace_s)
    except (subprocess.TimeoutExpired, Interrupted, KeyboardInterrupt):
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)  # data-loader workers or ranks still in the group


def run_stage_process(command: Sequence[str], env: Mapping[str, str], on_start: Callable[[int], None]) -> int:
    """Run a stage's process in its own process group, tied to the pipeline: when the pipeline is stopped (a signal,
    an error) or dies, the stage's process ends too. ``on_start`` gets its PID; returns its exit status."""
    proc = subprocess.Popen(list(command), env=dict(env), process_group=0, preexec_fn=_die_with_parent())
    try:
        on_start(proc.pid)
        return proc.wait()
    except BaseException:
        stop_process_group(proc)
        raise


def exit_status(code: int) -> int:
    """A child's exit status as a shell shows it: 128 + N for a process ended by signal N."""
    return 128 - code if code < 0 else code


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a checkpoint a later stage can load (missing, empty, cut short), or None."""
    p = Path(path)
    if not p.is_file():
        return "does not exist"
    size = p.stat().st_size
    if size == 0 or not zipfile.is_zipfile(p):  # torch.save's zip file ends with its directory: cut short, none
        return f"is not a complete checkpoint ({size} bytes)"
    return None


def product_problem(record: Mapping[str, Any]) -> str | None:
    """Why a ``stage.json``'s product cannot be used (its stage is then run again), or None."""
    product = record.get("product")
    if not isinstance(product, str) or not product:
        return "names no product"
    if record.get("kind") == "train":
        problem = checkpoint_problem(product)
        return f"names the checkpoint {product}, which {problem}" if problem else None
    return None if Path(product).exists() else f"names {product}, which does not exist"


def set_aside(stage_dir: Path) -> Path | None:
    """Move an earlier attempt's files (no checkpoint to resume from) to ``NAME.earlier-K``; None if empty."""
    if not stage_dir.is_dir() or not any(stage_dir.iterdir()):
        return None
    with DirectoryLock(stage_dir, "run directory"):  # not while a process still trains there
        pass
    k = 1
    while stage_dir.with_name(f"{stage_dir.name}.earlier-{k}").exists():
        k += 1
    target = stage_dir.with_name(f"{stage_dir.name}.earlier-{k}")
    stage_dir.rename(target)
    stage_dir.mkdir()
    return target


def train_stage(stage: Stage, stage_dir: Path, overrides: Sequence[str], user: Sequence[str]) -> dict[str, Any]:
    """Run (or resume) one training stage in ``stage_dir``; its ``metrics.json`` with the best checkpoint."""
    last = stage_dir / "checkpoints" / "last.ckpt"
    if checkpoint_problem(last) is None and (stage_dir / ".hydra").is_dir():
        say(f"{stage.name}: resuming from {last}")
        args = [f"ckpt_path={last}"]
    else:
        moved = set_aside(stage_dir)
        if moved is not None:
            say(f"{stage.name}: no checkpoint to resume from; the earlier attempt's files moved to {moved}")
        args = [*overrides, *user, f"hydra.run.dir={stage_dir}"]
    command = [sys.executable, "-m", "vss.train", *args]
    line = f"python -m vss.train {' '.join(args)}"
    code = run_stage_process(
        command, {**os.environ, PIPELINE_STAGE_ENV: stage.name}, lambda pid: say(f"{stage.name} (PID {pid}): {line}")
    )
    if code != 0:
        raise StageFailed(
            f"stage {stage.name} exited with status {exit_status(code)} (its run directory: {stage_dir})",
            exit_status(code),
        )
    metrics = read_json(stage_dir / "metrics.json")
    if metrics is None:
        raise StageFailed(f"stage {stage.name} finished without {stage_dir / 'metrics.json'}", 1)
    return metrics


def stage_record(stage: Stage, stage_dir: Path, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A finished training stage's ``stage.json``: its product is the best checkpoint, else ``last.ckpt``;
    :class:`StageFailed` when that checkpoint is missing or incomplete, or a ``last.ckpt`` is not of the final
    step (no ``stage.json`` is written then)."""
    best = metrics.get("best") or {}
    ckpt = best.get("ckpt_path") or str(stage_dir / "checkpoints" / "last.ckpt")
    problem = checkpoint_problem(ckpt)
    if problem is None and not best.get("ckpt_path"):
        from vss.checkpoint import checkpoint_step

        saved = checkpoint_step(ckpt)
        if saved != metrics.get("step"):
            problem = f"holds step {saved}, not the final step {metrics.get('step')}"
    if problem is not None:
        raise StageFailed(
            f"stage {stage.name} finished, but its checkpoint {ckpt} {problem}: nothing for the next stages to start "
            "from, so the stage is not recorded as done",
            1,
        )
    return {
        "name": stage.name,
        "kind": "train",
        "product": ckpt,
        "step": metrics.get("step"),
        "best_step": best.get("step", metrics.get("step")),
        "val": metrics.get("val", {}),
        "best_val": best.get("val", {}),
        "run_dir": str(stage_dir),
    }


def run_pass(stage: Stage, stage_dir: Path, products: Mapping[str, str]) -> str:
    """Call a pass's ``_target_`` with its arguments (placeholders filled) and ``output_dir``; its product."""
    from hydra.utils import instantiate

    spec = _fill(stage.run, products)
    say(f"{stage.name}: {spec['_target_']}({', '.join(f'{k}={v}' for k, v in spec.items() if k != '_target_')})")
    product = instantiate(spec, output_dir=str(stage_dir), _convert_="all")
    if not isinstance(product, str | Path):
        raise StageFailed(f"stage {stage.name}: {spec['_target_']} returned {product!r}, expected a path", 1)
    if not Path(product).exists():
        raise StageFailed(f"stage {stage.name}: {spec['_target_']} returned {product}, which does not exist", 1)
    return str(product)


def total_steps(stages: Sequence[Stage], records: Mapping[str, Mapping[str, Any]], name: str) -> int:
    """A training stage's own steps plus those of the stages whose checkpoints it (transitively) started from."""
    by_name = {s.name: s for s in stages}
    steps, current = 0, by_name[name]
    while current is not None:
        rec = records.get(current.name, {})
        steps += int(rec.get("best_step", rec.get("step", 0)) if current.name != name else rec.get("step", 0))
        current = by_name.get(current.parent) if current.parent else None
    return steps


def summary_table(stages: Sequence[Stage], records: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: one row per training stage, its total steps and final validation metrics."""
    head = "| stage | starts from | total steps | " + " | ".join(f"val {m}" for m in SUMMARY_METRICS) + " |"
    rows = [head, "|" + "---|" * (3 + len(SUMMARY_METRICS))]
    for s in stages:
        rec = records.get(s.name)
        if s.train is None or rec is None:
            continue
        val = rec.get("val", {})
        cells = [f"{val[m]:.4f}" if isinstance(val.get(m), int | float) else "-" for m in SUMMARY_METRICS]
        rows.append(f"| {s.label} | {s.parent or '-'} | {rec['total_steps']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_pipeline(stages: Sequence[Stage], user: Sequence[str], pipeline_dir: Path) -> dict[str, Any]:
    """Run every stage not yet done, in order; write ``pipeline.json`` / ``pipeline.md``; return the records.

    Holds the pipeline directory's lock throughout (:class:`vss.locks.DirectoryInUse` when another process does).
    """
    with DirectoryLock(pipeline_dir, "pipeline directory"):
        return _run_stages(stages, user, pipeline_dir)


def _run_stages(stages: Sequence[Stage], user: Sequence[str], pipeline_dir: Path) -> dict[str, Any]:
    products: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    for stage in stages:
        stage_dir = (pipeline_dir / stage.name).resolve()
        stage_dir.mkdir(parents=True, exist_ok=True)
        done = read_json(stage_dir / STAGE_FILE)
        problem = product_problem(done) if done is not None else None
        if done is not None and problem is None:
            say(f"{stage.name}: done earlier ({stage_dir / STAGE_FILE}), skipped")
        else:
            if problem is not None:
                say(f"{stage.name}: its {STAGE_FILE} {problem}: running the stage again")
                (stage_dir / STAGE_FILE).unlink()
            if stage.train is not None:
                metrics = train_stage(stage, stage_dir, _fill(stage.train, products), user)
                done = stage_record(stage, stage_dir, metrics)
            else:
                done = {"name": stage.name, "kind": "pass", "product": run_pass(stage, stage_dir, products)}
            write_json(done, stage_dir / STAGE_FILE)
        products[stage.name] = str(done["product"])
        records[stage.name] = done
    for stage in stages:
        if stage.train is not None:
            records[stage.name]["total_steps"] = total_steps(stages, records, stage.name)
    table = summary_table(stages, records)
    write_json({"stages": records, "overrides": list(user)}, pipeline_dir / "pipeline.json")
    (pipeline_dir / "pipeline.md").write_text(table + "\n")
    finished = "the stage is done" if len(stages) == 1 else f"all {len(stages)} stages done"
    say(f"{finished}; {pipeline_dir / 'pipeline.md'}:\n{table}")
    return records


def default_dir(experiment: str) -> Path:
    """``outputs/pipeline/<experiment>/<timestamp>`` (``VSS_ROOT`` moves ``outputs`` as for vss.train)."""
    root = Path(os.environ.get("VSS_ROOT", "."))
    return root / "outputs" / "pipeline" / experiment / time.strftime("%Y-%m-%d_%H-%M-%S")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vss.pipeline experiment=NAME [overrides] [pipeline_dir=DIR]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    overrides, own = friendly_errors(split_arguments)(args)
    stages, experiment = friendly_errors(compose_stages)(overrides)
    friendly_errors(check_stage_configs)(stages, overrides)
    pipeline_dir = Path(own["pipeline_dir"]) if own.get("pipeline_dir") else default_dir(experiment)
    count = f"{len(stages)} stage{'s' * (len(stages) != 1)}"
    say(f"{experiment}: {count} ({', '.join(s.name for s in stages)}) in {pipeline_dir}")
    again = f"rerun the same command with pipeline_dir={pipeline_dir} to continue from there"
    try:
        with stop_on_signals():
            friendly_errors(run_pipeline)(stages, overrides, pipeline_dir)
    except StageFailed as e:
        print_error(f"{e}; {again}")
        return e.code if e.code not in (0, None) else 1
    except Interrupted as e:
        print_error(f"vss.pipeline stopped by {e}; {again} (a training stage resumes from its last.ckpt)")
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
