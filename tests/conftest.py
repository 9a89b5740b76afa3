import contextlib
import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may need a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Fake credentials in every process of the session (Ray's workers inherit them from this one): the
# tracking tests look for them in every file a run writes. The trackers run offline: none is used.
FAKE_SECRETS = {"WANDB_API_KEY": "wandb-fake-key-4e1f0c9a7b", "HF_TOKEN": "hf_fakeToken8c2d5e1a",
                "MLFLOW_TRACKING_TOKEN": "mlflow-fake-token-93ab1d"}
os.environ.update(FAKE_SECRETS)
# every tracker, as users configure them (nikl_ray/tracking.py): what the `trained` fixture and the search test use
ALL_TRACKERS = ["tensorboard", "mlflow", {"wandb": {"mode": "offline", "project": "nikl-ray-tests"}}]

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIKL_DIR = SHARED / "nikl_ea_2023"
NSMC_DIR = SHARED / "nsmc_like"
DEMO_DIR = Path(__file__).resolve().parents[1] / "nikl_ray" / "demo_data"


def nikl_row(rid="r1", text="오늘 영화 너무 좋다", target=("영화", 3, 5), labels=("joy",)):
    from nikl_ray.tasks import NIKL_EMOTIONS

    form, begin, end = target if target else (None, None, None)
    return {"id": rid, "input": {"form": text, "target": {"form": form, "begin": begin, "end": end}},
            "output": {e: str(e in labels) for e in NIKL_EMOTIONS}}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """Tiny ELECTRA, RoBERTa, GPT-NeoX and Llama checkpoints built from the demo text, once per session."""
    from nikl_ray.data import read_rows
    from nikl_ray.tasks import get_task
    from nikl_ray.tiny import make_tiny_backbones

    rows = read_rows(DEMO_DIR / "train.jsonl", get_task("nikl-emotion"))
    return make_tiny_backbones(rows.texts, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance (2 CPUs) shared by the tests that need Ray. Its dashboard serves
    the state API that Ray Train needs to free the resources of trials Tune stops early."""
    import ray

    from nikl_ray.cluster import connect

    connect(local=True, num_cpus=2)
    yield
    ray.shutdown()


@contextlib.contextmanager
def package_logging_kept():
    """The package logger's set-up put back after the block: the CLI and the ray jobs give it a handler
    of their own and stop its propagation (caplog's way in), which would outlive them in this process."""
    import logging

    logger = logging.getLogger("nikl_ray")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate = handlers, propagate
        logger.setLevel(level)


@pytest.fixture
def cli(capsys):
    """`nikl-ray ARGS…` run in this process, as its console script runs it (what `main` returns is
    the exit code), without a new interpreter importing torch and transformers again for each
    call: (exit code, stdout, stderr). The logger's set-up is put back when the call returns."""
    from nikl_ray.cli import main

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        with package_logging_kept():
            code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def setup_run(raw: dict) -> tuple:
    """(experiment as the stages run it, its inputs) of the run `open_run` opens for `raw`."""
    from nikl_ray import open_run

    run = open_run(raw)
    return run.exp, run.inputs


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_backbones, ray_local):
    """Encoder full, GPT-NeoX LoRA and GPT-NeoX QLoRA (pair encoding), two folds each, trained once per
    session through real Ray Train and tracked by every tracker: (exp, data, train table path). Its
    data are copies of the demo files in a folder of their own (a test takes them out of reach to
    show a finished run needs none)."""
    import shutil

    from nikl_ray.stages import train

    data_dir = tmp_path_factory.mktemp("data")
    for name in ("train.jsonl", "test.jsonl"):
        shutil.copy(DEMO_DIR / name, data_dir / name)
    exp, data = setup_run({
        "task": "nikl-emotion", "train": str(data_dir / "train.jsonl"), "test": str(data_dir / "test.jsonl"),
        "results": str(tmp_path_factory.mktemp("results")), "folds": {"k": 2, "seed": 0},
        "defaults": {"epochs": 3, "batch_size": 16, "max_length": 40},
        "ensemble": {"hidden_sizes": [16, 32], "inner_folds": 2, "epochs": 60, "patience": 10},
        "tracking": {"tensorboard": True, "mlflow": {}, "wandb": ALL_TRACKERS[2]["wandb"], "log_every_steps": 5},
        "backbones": [
            # an encoder too slow to learn anything in 3 epochs: a degenerate member, left out of the ensembles
            {"name": "enc-full", "checkpoint": str(tiny_backbones["electra"]), "mode": "full", "lr": 1e-6},
            {"name": "neox-lora", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora", "lr": 5e-3, "lora_r": 8,
             "epochs": 8, "early_stopping_patience": 8, "target_encoding": "inline"},
            {"name": "neox-qlora", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "qlora", "lr": 5e-3, "lora_r": 8,
             "target_encoding": "pair"},
        ]})
    return exp, data, train.run(exp, data)


@pytest.fixture(scope="session")
def stacked(trained):
    """The trained fixture's features and ensemble: (exp, data, report path)."""
    from nikl_ray.stages import ensemble, features

    exp, data, _ = trained
    features.run(exp, data)
    return exp, data, ensemble.run(exp, data)


def nsmc_experiment(tmp_path, tiny_backbones, results) -> dict:
    """The single-label task on real NSMC-style reviews: 600 train and 80 test rows copied into
    `tmp_path`, one tiny GPT-NeoX member (LoRA) + TF-IDF, NB-SVM and USE + LR, 2 folds."""
    from itertools import islice

    def head(src, dst, n):
        with open(src, encoding="utf-8") as f:
            dst.write_text("".join(islice(f, n + 1)), encoding="utf-8")
        return str(dst)

    return {"task": "sentence-sentiment", "train": head(NSMC_DIR / "ratings_train.txt", tmp_path / "train.txt", 600),
            "test": head(NSMC_DIR / "ratings_test.txt", tmp_path / "test.txt", 80), "results": str(results),
            "folds": {"k": 2, "seed": 0}, "defaults": {"epochs": 2, "batch_size": 32, "max_length": 48, "lr": 5e-3},
            "backbones": [{"name": "neox", "checkpoint": str(tiny_backbones["gpt_neox"]), "mode": "lora"}],
            "classical": ["tfidf-lr", "nbsvm", "use-lr"],
            "ensemble": {"hidden_sizes": [16, 32], "inner_folds": 2, "epochs": 60, "patience": 10}}


@pytest.fixture(scope="session")
def single_label_run(tmp_path_factory, tiny_backbones, ray_local):
    """The NSMC-style pipeline run once on this machine's Ray: (raw experiment, pipeline output)."""
    from nikl_ray import open_run, pipeline

    if not NSMC_DIR.exists():
        pytest.skip("../shared/data/nsmc_like is absent")
    tmp = tmp_path_factory.mktemp("nsmc")
    raw = nsmc_experiment(tmp, tiny_backbones, tmp / "res")
    return raw, pipeline(open_run(raw))


def registered_epoch(run_dir: Path) -> float:
    """The epoch of the last checkpoint Ray Train has recorded for the run (what a restart restores
    from), 0 before the first. A checkpoint folder shows up while it is still being copied, before
    Ray registers it."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    return (snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("epoch", 0)


def resumed(history: list[dict]) -> bool:
    """True when the process that wrote the run's last epochs started from a checkpoint (each
    evaluation logs the step its process started from) and every epoch was evaluated exactly once."""
    epochs = [h["epoch"] for h in history if "eval_score" in h]
    starts = [h["resumed_from_step"] for h in history if "resumed_from_step" in h]
    return epochs == sorted(set(epochs)) and any(s > 0 for s in starts)


def kill_the_train_worker_after_its_first_checkpoint(run_dir: Path, timeout: float = 300) -> None:
    """SIGKILL the one Ray Train worker of the shared Ray instance once the run in `run_dir` has a
    checkpoint Ray Train registered (what its restart resumes from)."""
    import psutil
    from ray.util.state import list_actors

    from nikl_ray.cluster import api_server

    deadline = time.time() + timeout
    while time.time() < deadline and not registered_epoch(run_dir):
        time.sleep(0.2)
    # this Ray instance's Train workers only (other tests may run their own Ray beside it)
    workers = list_actors(address=api_server(), filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 1, workers
    psutil.Process(workers[0].pid).kill()


def kill_with_its_ray(proc) -> None:
    """SIGKILL a driver and every process under it at once, as a machine losing power would, and wait
    until all are gone. Its Ray's workers have process groups of their own: a `killpg` of the
    driver's group leaves them training (and checkpointing into the run's folder) for another
    moment, racing the rerun that resumes from that folder."""
    import signal

    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    _, alive = psutil.wait_procs(procs, timeout=30)
    def running(p) -> bool:  # a zombie is dead, just not yet reaped
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    alive = [p for p in alive if running(p)]
    assert not alive, alive


class Started:
    """A command running in the background; `wait()` gives its CompletedProcess (output in files, not
    pipes, so a chatty command never blocks on a pipe nobody reads yet)."""

    def __init__(self, cmd: list[str], env: dict):
        import subprocess
        import tempfile

        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=self._err, text=True,
                                      cwd=Path(__file__).resolve().parents[1])

    def wait(self, timeout: float = 600):
        import subprocess

        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # as subprocess.run does: no command outlives its test
            self._proc.kill()
            raise
        with self._out, self._err:
            self._out.seek(0), self._err.seek(0)
            return subprocess.CompletedProcess(self._proc.args, self._proc.returncode, self._out.read(), self._err.read())


_handed_out: set[int] = set()


def free_port() -> int:
    """A port for a server a test starts, never the same twice in this process. Taken from 20000–32767:
    below the kernel's ephemeral range (32768+), which every outgoing connection and every `bind(0)`
    of another process draws from, and above Ray's worker ports (10002–19999); a port handed out here
    cannot be taken between this check and the server's own bind by anything but another test process,
    which starts elsewhere in the range (by its pid)."""
    import socket

    start = 20000 + (os.getpid() * 37) % 12000
    for i in range(12768):
        port = 20000 + (start - 20000 + i) % 12768
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port in 20000-32767")


class RayCluster:
    """A Ray cluster of the test's own, from `ray start` (the head, and worker nodes on this machine):
    its own ports and temp dir; stopped by finding its processes, never with `ray stop` (which ends
    every Ray process on the machine)."""

    def __init__(self, name: str):
        self.temp = Path("/tmp") / f"ray-{name}-{os.getpid()}"  # Ray's socket paths must stay short
        # as the README starts a cluster: token authentication, Train runs listed on the dashboard
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
        self.address = self.dashboard = None
        self.free_port = free_port

    def run(self, *cmd, timeout=600, env: dict | None = None):
        return self.start(*cmd, env=env).wait(timeout)

    def start(self, *cmd, env: dict | None = None) -> "Started":
        """A command with the cluster's environment, started and not waited for: a driver spends its
        first seconds importing on one core, and this machine has two."""
        return Started(list(cmd), {**self.env, **(env or {})})

    def ray(self, *args, timeout=600):
        import sys

        return self.run(str(Path(sys.executable).with_name("ray")), *args, timeout=timeout)

    def _node_ports(self) -> list[str]:
        # Own ports for every node's agents too: their defaults (e.g. 52365 for the job agent) are held
        # by any other Ray instance on the machine, and the job server then has "No available agent".
        p = self.free_port
        return [f"--node-manager-port={p()}", f"--object-manager-port={p()}", f"--dashboard-agent-listen-port={p()}",
                f"--dashboard-agent-grpc-port={p()}", f"--runtime-env-agent-port={p()}", f"--metrics-export-port={p()}"]

    def start_head(self, *, cpus: int, gpus: int = 0) -> None:
        # the README's first step: `ray start` wants a token it can find (a fresh machine has none)
        out = self.ray("get-auth-token", "--generate")
        assert out.returncode == 0, out.stderr
        port, dash = self.free_port(), self.free_port()
        # every process of this cluster asks its own dashboard for Ray's state API (see cluster.connect)
        self.env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
        out = self.ray("start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                       *self._node_ports(), f"--num-cpus={cpus}", f"--num-gpus={gpus}", f"--temp-dir={self.temp}",
                       "--disable-usage-stats")
        assert out.returncode == 0, out.stderr
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"

    def add_node(self, *, cpus: int, gpus: int = 0, hide: Path | None = None) -> None:
        """A worker node; with `hide`, in a mount namespace of its own where that folder is an empty
        tmpfs: a node that cannot see what the others write there (like a node-local disk)."""
        import shlex
        import sys

        node = [str(Path(sys.executable).with_name("ray")), "start", f"--address={self.address}", *self._node_ports(),
                f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--disable-usage-stats"]
        if hide is None:
            out = self.run(*node)
        else:
            hide.mkdir(parents=True, exist_ok=True)
            script = f"mount -t tmpfs tmpfs {shlex.quote(str(hide))} && exec {shlex.join(node)}"
            out = self.run("unshare", "-m", "--propagation", "private", "sh", "-c", script)
        assert out.returncode == 0, out.stderr

    def stop(self) -> int:
        import psutil

        procs = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.temp) in part for part in (p.info["cmdline"] or [])):
                    procs.append(p)
            except psutil.Error:
                pass
        for p in procs:
            p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=3)  # some of Ray's daemons outwait a SIGTERM
        for p in alive:
            p.kill()
        return len(procs)
