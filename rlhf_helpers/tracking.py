"""Run tracking: `metrics.jsonl` (one JSON object per logged step) and an atomic `summary.json`.

Every stage writes into `run_dir/<stage>/`:
- `metrics.jsonl`: one object per logged step, always with a `step` key and namespaced metric keys
  (`objective/kl`, `loss/policy_avg`, ...); appended and flushed line by line, so a crash loses at most
  the line being written, and a resumed run appends after the last step it finds.
- `summary.json`: the final figures that the next stage and the tests read; written atomically.
- `config.json`: the stage config the run used, with its inputs' fingerprints (`run_settings`), written
  atomically; a resume refuses checkpoints whose config.json differs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterable


def _jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars, paths and dataclasses into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same folder and `os.replace`.

    A reader never sees a half-written file: it sees the old one or the new one. The file gets the
    permissions `open` would give it (the umask's), not the temporary file's owner-only ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`atomic_write_text` of `obj` as indented JSON (numpy/torch scalars converted)."""
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def atomic_write_dir(target: str | os.PathLike, write) -> Path:
    """Fill a temporary folder beside `target` with `write(tmp)`, then move it into place, replacing an
    older folder; a reader (or a resumed run) never sees half a folder, and a failed write leaves the old
    one as it was: if the swap itself fails, the old folder is moved back, and one that a killed process
    left aside (`.NAME.old`, no NAME) is moved back before anything else. The folder gets the permissions
    `mkdir` would give it, not the temporary one's."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        os.rename(old, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.is_dir() and not target.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder, if there is one, so that no reader ever sees part of it: it is renamed to a hidden
    `.NAME.deleting` first, then removed; such folders that a killed process left beside it are cleared. A
    checkpoint half-deleted in place could keep the file that marks it finished while losing its weights,
    and a resumed run would load it."""
    path = Path(path)
    trash = path.with_name(f".{path.name}.deleting")
    for leftover in path.parent.glob(".*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)
    if not path.is_dir():
        return
    os.rename(path, trash)
    shutil.rmtree(trash)


def in_notebook_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (JupyterLab, or papermill executing a notebook)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


class ProgressLine:
    """A count of work done, shown while it runs: `with ProgressLine(32, "sft: 32 prompts", "replies") as bar:
    ... bar.update(8)`. desc=None shows nothing.

    In a Jupyter kernel it is one line of text, updated in place under a display id, that ends as "desc:
    32/32 replies in 41 s". A saved or exported notebook keeps that last line. tqdm's notebook bar would
    keep its first text, "0%| 0/32", beside a widget that a static viewer cannot draw, and read as a hang.
    Elsewhere (a terminal, a test) it is a tqdm bar on stderr, cleared when the work ends or is interrupted.
    """

    def __init__(self, total: int, desc: str | None, units: str = "items"):
        import time

        self.total, self.desc, self.units, self.done = total, desc, units, 0
        self._now, self._start = time.perf_counter, time.perf_counter()
        self._bar = self._handle = None
        if desc is None:
            return
        if in_notebook_kernel():
            from IPython.display import display

            self._handle = display({"text/plain": self._text()}, raw=True, display_id=True)
        else:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=" " + units, leave=False, mininterval=0)

    def _text(self, finished: bool = False) -> str:
        line = f"{self.desc}: {self.done}/{self.total} {self.units}"
        return line + (f" in {self._now() - self._start:.0f} s" if finished else "")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._handle is not None:
            self._handle.update({"text/plain": self._text()}, raw=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._handle is not None:
            finished = self.done >= self.total
            self._handle.update({"text/plain": self._text(finished) + ("" if finished else " (stopped)")}, raw=True)
        self._bar = self._handle = None

    def __enter__(self) -> "ProgressLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StageClock:
    """Seconds spent producing a stage's model, across interrupted sessions.

    Start it with the stage; every checkpoint gets the running total (`stamp`, into `elapsed.json`), and a
    session that resumes from a checkpoint adds the total written there (`resumed`). So a resumed stage's
    `wall_time_s` is what producing its model cost, not only the last session's share. Work an interrupted
    session did after its last checkpoint is not counted: it is redone, and counted then. Given the stage's
    `PeakMemory`, it carries the peak the same way: the largest of every session's."""

    FILE = "elapsed.json"

    def __init__(self, memory: "PeakMemory | None" = None):
        import time

        self._now = time.perf_counter
        self.start = self._now()
        self.memory = memory
        self.before: float | None = 0.0  # seconds spent before this session; None: the checkpoint did not say
        self.peak_before: float | None = None  # MB, the earlier sessions' peak, when recorded

    def resumed(self, checkpoint: str | os.PathLike | None) -> None:
        """Count the seconds recorded in `checkpoint` (None: a fresh start, nothing to add)."""
        record = Path(checkpoint) / self.FILE if checkpoint else None
        saved = read_json(record) if record is not None and record.exists() else {}
        self.before = 0.0 if record is None else float(saved["seconds"]) if "seconds" in saved else None
        self.peak_before = saved.get("peak_memory_mb")

    @property
    def seconds(self) -> float:
        """This session's seconds plus those recorded before it (when known)."""
        return (self.before or 0.0) + self._now() - self.start

    def peak_mb(self) -> float | None:
        """The peak memory of every session so far (None without a `PeakMemory`, or when an earlier
        session's checkpoint did not record it)."""
        if self.memory is None or self.before is None:
            return None
        return max(self.memory.peak_mb(), self.peak_before or 0.0)

    def stamp(self, checkpoint: str | os.PathLike) -> None:
        record = {"seconds": self.seconds}
        if self.memory is not None:
            record["peak_memory_mb"] = self.peak_mb()
        atomic_write_json(Path(checkpoint) / self.FILE, record)

    def facts(self) -> dict[str, Any]:
        """For a summary: `wall_time_s` (all sessions) and `resumed_time_s` (the sessions before this one);
        with a `PeakMemory`, its facts, the peak taken over every session. Resumed from a checkpoint that
        recorded neither (written before clocks were stamped), both are None: unknown, not this session's
        share passed off as the whole."""
        facts: dict[str, Any] = {"wall_time_s": None if self.before is None else self.seconds,
                                 "resumed_time_s": self.before}
        if self.memory is not None:
            facts.update(self.memory.facts(), peak_memory_mb=self.peak_mb(),
                         peak_memory_earlier_sessions_mb=self.peak_before)
        return facts


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a `metrics.jsonl`. A torn last line (from a crash mid-write) is skipped and reported."""
    return _read_rows(path)[0]


def _read_rows(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """`read_metrics`'s rows, and whether the file ends cleanly (no torn last line, a final newline), so that
    rows appended to it start on a line of their own."""
    path = Path(path)
    rows: list[dict] = []
    if not path.exists():
        return rows, True
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    clean = not text or text.endswith("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                print(f"{path}:{i}: skipped a torn last line (an interrupted write): {e}")
                clean = False
                continue
            raise ValueError(f"{path}:{i}: not valid JSON ({e}); the metrics file is corrupt") from e
    return rows, clean


def half_means(rows: Iterable[dict], key: str) -> dict[str, float | None]:
    """Did `key` rise over training? The mean over the first half of the rows that hold it, over the second
    half, their difference, its standard error and the rows in each half: {'first_half', 'second_half',
    'change', 'change_se', 'steps_per_half'}.

    One rollout's mean is a noisy number (a batch of a few replies to a few prompts), so the first and the
    last step alone can show a rise or a fall that is not there. With an odd count the middle row is left out;
    fewer than two rows give None throughout (one row per half: no standard error)."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    half = len(values) // 2
    if half < 1:
        return {"first_half": None, "second_half": None, "change": None, "change_se": None, "steps_per_half": half}
    a, b = values[:half], values[len(values) - half:]
    se = math.sqrt((statistics.variance(a) + statistics.variance(b)) / half) if half > 1 else None
    return {"first_half": statistics.fmean(a), "second_half": statistics.fmean(b),
            "change": statistics.fmean(b) - statistics.fmean(a), "change_se": se, "steps_per_half": half}


RISE_KEYS = {"scores_halves": "objective/scores", "raw_scores_halves": "objective/raw_scores",
             "eos_frac_halves": "response/eos_frac", "gold_halves": "objective/gold"}
"""What an online RL stage's summary reports the rise of: summary key -> metrics key (`plotting.rise_table`)."""


def rise_halves(rows: Iterable[dict]) -> dict[str, dict[str, float | None]]:
    """`half_means` of each of RISE_KEYS in an online RL stage's metrics rows (PPO, GRPO, RLOO), under its
    summary key."""
    rows = list(rows)
    return {name: half_means(rows, key) for name, key in RISE_KEYS.items()}


def keep_rows_through(path: str | os.PathLike, step: int) -> None:
    """Rewrite a step-keyed jsonl file (samples.jsonl) with only its rows of steps <= `step`, atomically: a
    resumed run redoes the later steps, so their rows must go. A missing file is left missing."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_metrics(path) if int(r["step"]) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLogger:
    """Append one JSON object per step to `stage_dir/metrics.jsonl`; write `summary.json` at the end.

    >>> log = MetricsLogger("runs/demo/concepts")
    >>> log.log(step=1, **{"loss/policy_avg": 0.3})
    >>> log.summary({"final/distance": 0.01})

    With `resume=True` (the default) an existing file is kept and `last_step` tells where it ended,
    so a resumed run continues the same curve; with `resume=False` it starts afresh.
    """

    def __init__(self, stage_dir: str | os.PathLike, resume: bool = True, echo_every: int = 0):
        self.stage_dir = Path(stage_dir)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.stage_dir / "metrics.jsonl"
        self.echo_every = echo_every
        self.rows: list[dict] = []
        if resume:
            self.rows, clean = _read_rows(self.path)
            if not clean:  # rows appended after a torn or unterminated last line would join it
                self._rewrite()
                print(f"{self.path}: rewritten without its torn last line; {len(self.rows)} row(s) kept")
        elif self.path.exists():
            self.path.unlink()
        self._callbacks: list = []

    @property
    def last_step(self) -> int:
        return max((int(r.get("step", -1)) for r in self.rows), default=-1)

    def add_callback(self, fn) -> None:
        """Call `fn(row)` after every logged row (live plots use this)."""
        self._callbacks.append(fn)

    def log(self, step: int, **metrics: Any) -> dict:
        row = {"step": int(step), **_jsonable(metrics)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.rows.append(row)
        if self.echo_every and step % self.echo_every == 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"[step {step}] {shown}")
        for fn in self._callbacks:
            fn(row)
        return row

    def truncate_after(self, step: int) -> int:
        """Drop rows logged after `step` (a run resuming from the checkpoint at `step` redoes them).
        Returns how many rows were dropped; the file is rewritten atomically."""
        kept = [r for r in self.rows if int(r.get("step", -1)) <= step]
        dropped = len(self.rows) - len(kept)
        if dropped:
            self.rows = kept
            self._rewrite()
            print(f"{self.path}: dropped {dropped} row(s) logged after step {step}, to be redone on resume")
        return dropped

    def _rewrite(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def log_many(self, rows: Iterable[dict]) -> None:
        for row in rows:
            row = dict(row)
            self.log(row.pop("step"), **row)

    def summary(self, summary: dict) -> Path:
        return atomic_write_json(self.stage_dir / "summary.json", summary)

    def save_config(self, config: Any) -> Path:
        return atomic_write_json(self.stage_dir / "config.json", config)


class PeakMemory:
    """Peak memory of one stage, in MiB, on the device the stage runs on (`device`: cpu, cuda[:N] or auto):
    CUDA's peak allocation since `start()`, or on CPU the process's peak resident set since `start()` (Linux
    resets it through /proc/self/clear_refs; elsewhere the process's lifetime peak, so an earlier stage's peak
    can show through). `memory_at_start_mb` is measured the same way: the resident set on CPU, CUDA's
    allocation on a GPU, so the two figures can be compared."""

    def __init__(self, device: str = "auto"):
        self.device = device

    def start(self) -> "PeakMemory":
        import torch

        on_gpu = self.device.startswith("cuda") or self.device == "auto"
        self.cuda = on_gpu and torch.cuda.is_available()
        self.start_mb = torch.cuda.memory_allocated() / 2**20 if self.cuda else _status_mb("VmRSS")
        self.reset = False
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
                self.reset = True
            except OSError:
                pass
        return self

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _status_mb("VmHWM")
        return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def facts(self) -> dict[str, Any]:
        kind = "cuda_max_allocated" if self.cuda else ("rss_peak_since_start" if self.reset else "rss_peak_of_process")
        return {"peak_memory_mb": self.peak_mb(), "memory_at_start_mb": self.start_mb, "peak_memory_kind": kind}


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


RESUME_FREE = ("max_steps", "resume", "save_steps", "keep_checkpoints", "sample_every", "n_samples",
               "logging_steps", "eval_steps")
"""Config fields a resumed run may change (how long to train, where its learning rate does not follow the
length: `resume_free`; how often to save or log)."""


def changed_settings(stage_dir: str | os.PathLike, config: Any, free: Iterable[str] = RESUME_FREE) -> list[str]:
    """Fields of `config` that differ from the run's saved config.json (those in `free` aside): a checkpoint
    made with other settings must not be resumed as if it were this run's."""
    path = Path(stage_dir) / "config.json"
    if not path.exists():
        return []
    saved, now = read_json(path), _jsonable(config)
    return sorted(k for k in set(saved) | set(now) if k not in set(free) and saved.get(k) != now.get(k))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
"""The files a folder's `fingerprint` reads."""


def fingerprint(source: Any) -> str:
    """sha256 of what `source` is: a local file's bytes; a local folder's weight files (`WEIGHT_SUFFIXES`,
    anywhere under it: their relative names and bytes); anything else (a hub id or built-in model name, a
    reward's config, a list of prompts) its JSON text. A stage records its inputs' fingerprints, so that a
    resume can tell when the model it starts from, its data or its reward has changed since its checkpoints
    were made. A folder's configs are not read: peft writes `target_modules`, a set, in another order in each
    process, so a model saved again unchanged would look new."""
    import hashlib

    digest = hashlib.sha256()
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is None or not path.exists():
        digest.update(json.dumps(_jsonable(source), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        return digest.hexdigest()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and
                                                 p.name.endswith(WEIGHT_SUFFIXES))
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def run_settings(config: Any, data: Any = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a stage's config.json records: the config's fields; when `data` is given, `data_sha256`, a
    fingerprint of the training data; and for each `inputs` entry (say "policy": the SFT model's folder,
    "reward": the reward's config), `<name>_sha256`, its `fingerprint`. A resume refuses checkpoints whose
    recorded settings differ, so a stage retrains when its data or what it builds on has changed."""
    settings = _jsonable(config)
    if data is not None:
        settings["data_sha256"] = fingerprint(list(data))
    for name, source in (inputs or {}).items():
        settings[f"{name}_sha256"] = fingerprint(source)
    return settings


def schedule_follows_length(cfg: Any) -> bool:
    """Whether `cfg`'s learning rate is scheduled over its max_steps: a decay (an `lr_scheduler` other than
    "constant") or a warm-up (`warmup`, a fraction of max_steps); a config without those fields says so by its
    class's `LR_FOLLOWS_LENGTH` (the reward model's fixed cosine). Then another max_steps gives every step
    another rate, and checkpoints made under one length are not those of the other."""
    if hasattr(cfg, "lr_scheduler"):
        return cfg.lr_scheduler != "constant" or float(getattr(cfg, "warmup", 0) or 0) > 0
    return bool(getattr(cfg, "LR_FOLLOWS_LENGTH", False))


def resume_free(cfg: Any) -> tuple[str, ...]:
    """The fields of `cfg` a resumed run may change: RESUME_FREE (less max_steps where the learning rate's
    schedule is drawn over it, `schedule_follows_length`), and the config class's `EVAL_ONLY` (what a notebook
    measures after training, e.g. how many replies it compares: they leave the model as it is)."""
    free = tuple(f for f in RESUME_FREE if f != "max_steps" or not schedule_follows_length(cfg))
    return free + tuple(getattr(cfg, "EVAL_ONLY", ()))


def settings_changed(stage_dir: str | os.PathLike, config: Any, free: Iterable[str] = RESUME_FREE) -> bool:
    """Whether stage_dir/checkpoints holds a run made with other settings than `config` (those in `free`
    aside; said aloud when so): such checkpoints are not resumed, the stage starts over."""
    ckpts = Path(stage_dir) / "checkpoints"
    changed = changed_settings(stage_dir, config, free) if ckpts.is_dir() else []
    if changed:
        print(f"The checkpoints in {ckpts} were made with other settings ({', '.join(changed)}): starting over.")
    return bool(changed)


def last_checkpoint(folder: str | os.PathLike, max_step: int | None = None) -> str | None:
    """The newest complete `checkpoint-N` in `folder` (a transformers/TRL trainer's) with N ≤ `max_step`, or
    None. A trainer writes a checkpoint's files straight into its folder and `trainer_state.json` last, so a
    folder without it is a save that was interrupted: it is removed, with a note, and the one before it is
    used. Checkpoints past `max_step` (a longer run before, now cut shorter) are removed too, with a note:
    resuming from one would hand back a model trained longer than asked, and the metrics are cut back to
    the checkpoint used."""
    folder = Path(folder)
    found = sorted((int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit()) if folder.is_dir() else []
    for step, path in reversed(found):
        if max_step is not None and max_step > 0 and step > max_step:
            print(f"{path}: step {step} is past max_steps={max_step}; removed, resuming from an earlier checkpoint")
            remove_dir(path)
        elif (path / "trainer_state.json").exists():
            return str(path)
        else:
            print(f"{path}: an interrupted save (no trainer_state.json); removed, resuming from the checkpoint "
                  "before it")
            remove_dir(path)
    return None


def resume_point(out: Path, cfg: Any, data: Any = None,
                 inputs: dict[str, Any] | None = None) -> tuple[str | None, MetricsLogger, dict[str, Any]]:
    """(last checkpoint or None, metrics logger, settings to save as config.json): rows logged after the
    checkpoint are dropped, to be redone; with cfg.resume=False, or settings (config fields, and the
    fingerprints of `data` and `inputs` when given: see `run_settings`) that differ from the saved run's,
    old checkpoints and metrics go."""
    ckpt_dir = out / "checkpoints"
    settings = run_settings(cfg, data, inputs)
    resume = cfg.resume and not settings_changed(out, settings, resume_free(cfg))
    if not resume:
        remove_dir(ckpt_dir)
    ckpt = last_checkpoint(ckpt_dir, getattr(cfg, "max_steps", None)) if resume else None
    logger = MetricsLogger(out, resume=ckpt is not None)
    if ckpt:
        logger.truncate_after(int(Path(ckpt).name.split("-")[-1]))
        print(f"Resuming from {ckpt}.")
    return ckpt, logger, settings
