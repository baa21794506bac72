"""Many training runs in worker processes: reused when finished, resumed when interrupted, one progress bar.

Used by the benchmarks that train (the synthetic tables, the language-modeling comparison). Each run has a
directory; its result.json, written last and atomically, records the settings it was made with, so a run that
finished before with the same settings is reused and anything else is (re)trained, resuming from its last
checkpoint. Small models are overhead-bound, so several one-thread runs side by side beat one many-thread run.
The parent process follows the runs' log.jsonl files for the progress display; workers exit if it dies.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..data.files import atomic_write


def read_log(run_dir: Path) -> list[dict]:
    """The records of a run's log.jsonl so far (a line still being written is left out)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def settings_of(model_cfg, data, train) -> dict:
    """A run's (model, data, train) configs as JSON gives them back: what decides whether a result is reusable."""
    from dataclasses import asdict

    return json.loads(json.dumps({"model": model_cfg.to_dict(), "data": asdict(data), "train": asdict(train)}))


def finished_result(run_dir: Path, settings: dict) -> dict | None:
    """The earlier result in run_dir when it exists and was made with these settings."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("settings") == settings else None


def _exit_with_parent() -> None:
    """In a worker: exit when the parent process dies (a hard kill must not leave runs training on)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _work(train_one: Callable[[dict], dict], job: dict, run_dir: Path, settings: dict, threads: int) -> dict:
    """Worker: train one run, then write its result.json (with time and settings) atomically."""
    import torch

    _exit_with_parent()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = {**job, **train_one(job), "seconds": time.perf_counter() - start, "settings": settings}
    text = json.dumps(result, indent=1)
    atomic_write(run_dir / "result.json", lambda tmp: tmp.write_text(text))  # half a result never looks finished
    return result


def run_all(
    jobs: list[dict],
    train_one: Callable[[dict], dict],
    run_dir: Callable[[dict], Path],
    settings: Callable[[dict], dict],
    workers: int,
    steps: int,
    desc: str,
    label: Callable[[dict, list[dict]], str],
    progress: bool = True,
) -> tuple[list[dict], int, float]:
    """Train every job not finished before; returns (results in job order, runs reused, wall seconds).

    train_one(job) -> result fields; it runs in a worker, so it must be picklable (a module-level function or
    a functools.partial of one) and resume its run. steps: a run's step budget, for the progress bar.
    label(job, log records) -> what the bar shows for a running job.
    """
    results: dict[int, dict] = {}
    todo = []
    for i, job in enumerate(jobs):
        done = finished_result(run_dir(job), settings(job))
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    wall = time.perf_counter()
    if todo:
        bar = _Progress(jobs, todo, run_dir, steps, desc, label, enabled=progress)
        try:
            _train_in_workers(jobs, todo, train_one, run_dir, settings, workers, results, bar)
        finally:
            bar.close()
    return [results[i] for i in range(len(jobs))], len(jobs) - len(todo), time.perf_counter() - wall


def _train_in_workers(jobs, todo, train_one, run_dir, settings, workers: int, results: dict, bar) -> None:
    """Train jobs[i] for every i in todo in a pool of worker processes, filling results[i] as each finishes."""
    n_workers = min(workers, len(todo))
    threads = max(1, (os.cpu_count() or 1) // n_workers)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
        futures = {
            pool.submit(_work, train_one, jobs[i], run_dir(jobs[i]), settings(jobs[i]), threads): i for i in todo
        }
        pending = set(futures)
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    results[futures[f]] = f.result()
                bar.update(results)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


class _Progress:
    """One bar over every step of the runs still to train, fed by their log.jsonl files."""

    def __init__(self, jobs, todo, run_dir, steps: int, desc: str, label, enabled: bool):
        self.jobs, self.todo, self.run_dir, self.steps, self.label = jobs, todo, run_dir, steps, label
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=len(todo) * steps, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, results: dict[int, dict]) -> None:
        """Show the steps done so far: finished runs whole, running ones from their logs."""
        if self.bar is None:
            return
        done, running = 0, []
        for i in self.todo:
            if i in results:  # an early stop counts as the whole run
                done += self.steps
                continue
            records = read_log(self.run_dir(self.jobs[i]))
            steps = [r["step"] for r in records if "loss" in r]
            if steps:
                done += steps[-1]
                running.append(self.label(self.jobs[i], records))
        self.bar.n = done
        finished = sum(i in results for i in self.todo)
        self.bar.set_postfix_str(f"{finished}/{len(self.todo)} runs done; " + ", ".join(running), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
