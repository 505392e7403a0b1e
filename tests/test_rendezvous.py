"""Multi-node torchrun for real, on one host: two `tools/launch/torchrun.sh` agents (NNODES=2, one rank each,
TP=2 across the two "nodes") rendezvous over c10d on localhost; one "node" dies mid-run (its agent and its
worker SIGKILLed, as when a machine goes down) → the survivor exits within seconds with one line naming the last
checkpoint; both relaunched with trainer.resume=auto → the run finishes with the weights of an uninterrupted
single-agent run, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from spin_megatron.parallel.peers import lost_peer
from spin_megatron.ports import pick_free_port
from tests.helpers import REPO, assert_same_hf_export

TORCHRUN = REPO / "tools" / "launch" / "torchrun.sh"
RUN = ["experiment=tiny_cpu", "parallel.tp=2", "trainer.total_steps=4", "trainer.test_freq=0"]
LOST = "lost contact with another process of this run"


def _env(**extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NNODES"))
    }
    return {**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in extra.items()}}


def _agent(node_rank: int, port: int, out: Path, log: Path, *extra: str, **env_extra) -> subprocess.Popen:
    env = _env(
        NNODES=2,
        NODE_RANK=node_rank,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        NPROC_PER_NODE=1,
        **env_extra,
    )
    env["RDZV_ID"] = f"test-{port}"
    return subprocess.Popen(
        ["bash", str(TORCHRUN), *RUN, f"trainer.output_dir={out}", *extra],
        env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _two_agents(out: Path, logs: Path, *extra: str) -> list[subprocess.Popen]:
    port = pick_free_port()  # node 0's agent binds it for the c10d store
    logs.mkdir(parents=True, exist_ok=True)
    return [_agent(rank, port, out, logs / f"node{rank}.log", *extra) for rank in (0, 1)]


def _steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _descendants(pid: int) -> list[int]:
    """pid and every process below it: a torchrun agent starts its workers in sessions of their own, so a
    process-group kill of the agent would leave the worker running (as a real node failure does not)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _wait_all(agents: list[subprocess.Popen], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    try:
        return [agent.wait(timeout=max(1.0, deadline - time.monotonic())) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                for pid in _descendants(agent.pid):
                    os.kill(pid, signal.SIGKILL)
                agent.wait()


@pytest.mark.parametrize(
    "error, expected",
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:16776: Connection reset by peer. "
                      "This is typically caused by a remote worker hanging"),
         "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:16776: Connection reset by peer."),
        (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv"),
         "RuntimeError: [../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv"),
        (dist.DistNetworkError("failed to recv, got 0 bytes\nException raised from recvBytes"),
         "DistNetworkError: failed to recv, got 0 bytes"),
        (ValueError("broken pipe in my own code"), None),  # not from a collective: a bug keeps its traceback
        (RuntimeError("gloo: shapes do not match"), None),  # a collective misused: a bug too
    ],
)  # fmt: skip
def test_a_lost_peer_is_told_apart_from_a_bug(error, expected):
    assert lost_peer(error) == expected


@pytest.fixture(scope="module")
def single_agent(tmp_path_factory, qwen_tokenizer_dir, gsm8k_dir):
    """The reference: the same 4 steps from one agent with both ranks (torchrun --standalone)."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = subprocess.run(
        ["bash", str(TORCHRUN), *RUN, f"trainer.output_dir={out}"], env=_env(NPROC_PER_NODE=2), cwd=REPO,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [m["step"] for m in _steps(out)] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "step_0000004" / "COMPLETE").is_file()
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.dist
@pytest.mark.slow
def test_a_node_lost_mid_run_is_named_and_the_relaunch_resumes_to_the_same_weights(single_agent, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    agents = _two_agents(out, logs / "attempt0")
    # Let the run pass its step-2 checkpoint, then take node 1 down (agent and worker, SIGKILL).
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_0000002" / "COMPLETE").is_file():
        assert all(a.poll() is None for a in agents), [a.returncode for a in agents]
        assert time.monotonic() < deadline, "no step-2 checkpoint within 300 s"
        time.sleep(0.1)
    killed_at = time.monotonic()
    for pid in _descendants(agents[1].pid):
        os.kill(pid, signal.SIGKILL)
    codes = _wait_all(agents, timeout_s=120)
    survivor_s = time.monotonic() - killed_at
    survivor_log = (logs / "attempt0" / "node0.log").read_text()
    assert codes[0] != 0 and codes[1] == -signal.SIGKILL, codes
    (line,) = [line for line in survivor_log.splitlines() if LOST in line]
    assert line.startswith("spin-train: error [rank ") and "Connection" in line, line
    assert f"the last complete checkpoint is {out / 'checkpoints'}/step_0000" in line, line
    assert line.endswith("relaunch the same command on every node (trainer.resume=auto) to continue from it")
    assert "exitcode  : 3" in survivor_log  # torchrun's report: our exit code for a lost peer
    print(f"survivor exited {survivor_s:.1f} s after the other node died")
    # Until the kill, the two-node run is the single-agent run, step for step.
    reference = {m["step"]: m for m in _steps(single_agent)}
    before = _steps(out)
    assert [m["step"] for m in before][:2] == [1, 2]
    for metrics in before:
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert metrics[key] == reference[metrics["step"]][key], (metrics["step"], key)

    # Both nodes relaunched (a new rendezvous): the run resumes from its checkpoint and finishes.
    agents = _two_agents(out, logs / "attempt1", "trainer.resume=auto")
    codes = _wait_all(agents, timeout_s=600)
    assert codes == [0, 0], (logs / "attempt1" / "node0.log").read_text()[-3000:]
    assert [m["step"] for m in _steps(out)][-1] == 4
    assert_same_hf_export(out, single_agent)


@pytest.mark.dist
def test_a_node_whose_peer_never_comes_gives_up_after_the_join_timeout(tmp_path):
    log = tmp_path / "node0.log"
    start = time.monotonic()
    agent = _agent(0, pick_free_port(), tmp_path / "run", log, RDZV_JOIN_TIMEOUT=5)
    code = _wait_all([agent], timeout_s=120)[0]
    text = log.read_text()
    assert code != 0 and "RendezvousTimeoutError" in text, text[-2000:]
    assert time.monotonic() - start < 60  # RDZV_JOIN_TIMEOUT=5, not torch's 600 s
