"""A protocol double of an SGLang 0.5.23 HTTP server, for what neither the real CPU server nor a GPU can show in
the suite: scripted faults (HTTP 500, malformed answers, a crash mid-request, a server that never gets healthy)
and the memory saver, which needs CUDA on a real server.

It answers as the real server does where the trainer depends on it (read off sglang 0.5.23's
``srt/entrypoints/http_server.py`` and ``srt/managers/scheduler_components/weight_updater.py``):

- ``/update_weights_from_*`` outside a ``/begin_weight_update`` … ``/end_weight_update`` session: HTTP 400;
  a second ``/begin_weight_update``: HTTP 400 "already open"; ``/end_weight_update`` without one: HTTP 400;
- ``/release_memory_occupation`` while a request runs: refused (the real server asserts it is idle);
- released weights are LOST (the real server keeps no CPU copy): until weights are loaded again, ``/generate``
  answers HTTP 500 here (the real server would return garbage tokens, which a test cannot tell from sampling);
- ``/generate`` while the KV cache is released: HTTP 500 (the real server has no cache to run it in);
- ``/resume_memory_occupation`` of a region that is not released: the scheduler's ``offload_tags.remove`` raises
  ``KeyError`` and the server dies (SIGQUIT): here every later request answers HTTP 500 ("dead");
- ``/update_weight_version`` sets what ``GET /model_info`` reports as ``weight_version`` ("default" at start).

Run as a script, it is the double as a server process (crash and launch tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from spin_megatron.ports import pick_free_port
from spin_megatron.rollout.protocol import SamplingParams
from spin_megatron.rollout.sglang import protocol as proto
from spin_megatron.rollout.sglang.protocol import parse_generate_response
from spin_megatron.rollout.sglang.server import _die_with_parent

PARAMS = SamplingParams(n=3, temperature=0.8, max_new_tokens=3, seed=7)
WEIGHT_UPDATES = ("/update_weights_from_tensor", "/update_weights_from_distributed")


def fake_generation(payload: dict) -> dict:
    """The double's answer to one /generate: tokens depend on the prompt and the sampling seed only."""
    ids, sampling = payload["input_ids"], payload["sampling_params"]
    seed, limit = sampling.get("sampling_seed", 0), sampling["max_new_tokens"]
    length = min(limit, 1 + (sum(ids) + seed) % 4)
    tokens = [(ids[-1] + seed + 7 * k) % 1000 for k in range(length)]
    finish = (
        {"type": "length", "length": length} if length == limit else {"type": "stop", "matched": tokens[-1]}
    )
    logprobs = [[-0.25 * (k + 1), token, None] for k, token in enumerate(tokens)]
    meta = {"id": "r", "finish_reason": finish, "prompt_tokens": len(ids), "output_token_logprobs": logprobs}
    return {"output_ids": tokens, "meta_info": meta}


def expected_output(prompt: list[int], position: int, index: int) -> proto.GenerateOutput:
    payload = proto.generate_payload(prompt, PARAMS, seed=proto.sample_seed(PARAMS.seed, position, index))
    return parse_generate_response(fake_generation(payload))[0]


def _ok(message: str = "Success") -> tuple[int, str]:
    return 200, json.dumps({"success": True, "message": message})


def _refused(message: str) -> tuple[int, str]:
    return 400, json.dumps({"success": False, "message": message})


class DoubleState:
    """What one double server answers and what it saw.

    ``mode``: ok | never_healthy | error_500 | malformed | crash_on_generate | no_sessions (a server older than
    the session endpoints: 404 there, updates accepted without a session) | busy_on_release (the release's idle
    assertion fails). ``fail_update_at``: the k-th weight
    update (1-based) is refused with HTTP 400, as SGLang does when a load fails."""

    def __init__(self, mode: str = "ok", delay_s: float = 0.0, flush_busy: int = 0, fail_update_at: int = 0):
        self.mode, self.delay_s, self.flush_busy = mode, delay_s, flush_busy
        self.fail_update_at = fail_update_at
        self.lock, self.inflight, self.max_inflight = threading.Lock(), 0, 0
        self.calls: list[tuple[str, object]] = []  # (path, JSON body)
        self.session_open = False
        self.released: set[str] = set()
        self.weights_lost = False  # released weights resumed without a reload: they serve garbage
        self.updates = 0
        self.weight_version = "default"
        self.versions: list[str] = []  # every /update_weight_version, in order (not in `calls`)
        self.dead: str | None = None  # why the server died (SGLang's scheduler raised)

    def paths(self) -> list[str]:
        return [path for path, _ in self.calls]

    def handle_post(self, path: str, body) -> tuple[int, str]:
        if self.dead:
            return 500, json.dumps({"error": f"the server died: {self.dead}"})
        if path == "/update_weight_version":
            self.weight_version = body["new_version"]
            self.versions.append(body["new_version"])
            return _ok(f"Weight version updated to {body['new_version']}")
        with self.lock:
            self.calls.append((path, body))
            self.flush_busy -= path == "/flush_cache"
        if path == "/flush_cache":  # SGLang answers 400 while requests are still running
            return (400, "running requests") if self.flush_busy >= 0 else (200, "Cache flushed.\n")
        if path == "/generate":
            return self._generate(body)
        if path.endswith("_memory_occupation"):
            return self._memory(path, body["tags"])
        if path in ("/begin_weight_update", "/end_weight_update"):
            return self._session(path)
        if path in WEIGHT_UPDATES:
            return self._update(path)
        if path in ("/init_weights_update_group", "/destroy_weights_update_group"):
            return _ok()
        return 404, '{"detail": "Not Found"}'

    def _session(self, path: str) -> tuple[int, str]:
        if self.mode == "no_sessions":
            return 404, '{"detail": "Not Found"}'
        if path == "/begin_weight_update":
            if self.session_open:
                return _refused("a weight-update session is already open; call end_weight_update() first")
            self.session_open = True
            return _ok()
        if not self.session_open:
            return _refused("no weight-update session is open; call begin_weight_update() first")
        self.session_open = False
        return _ok()

    def _update(self, path: str) -> tuple[int, str]:
        if self.mode != "no_sessions" and not self.session_open:
            return _refused(f"{path[1:]} must run between begin_weight_update() and end_weight_update()")
        if "weights" in self.released:
            return _refused("weights are released: resume_memory_occupation(['weights']) first")
        self.updates += 1
        if self.updates == self.fail_update_at:
            return _refused("Failed to update parameter online: shape mismatch (scripted)")
        self.weights_lost = False
        return _ok()

    def _memory(self, path: str, tags: list[str]) -> tuple[int, str]:
        if path == "/release_memory_occupation":
            if self.inflight or self.mode == "busy_on_release":
                return 500, "release_memory_occupation should be called only when server is idle."
            self.released |= set(tags)
            return 200, "null"
        missing = [tag for tag in tags if tag not in self.released]
        if missing:  # SGLang: offload_tags.remove(tag) raises in the scheduler, which SIGQUITs the server
            self.dead = f"KeyError: {missing[0]!r} (resume_memory_occupation of a region not released)"
            return 500, json.dumps({"error": self.dead})
        if "weights" in tags:
            self.weights_lost = True  # resumed without a CPU backup: the contents are gone
        self.released -= set(tags)
        return 200, "null"

    def _generate(self, body) -> tuple[int, str]:
        if self.released:
            return 500, json.dumps({"error": f"memory released: {sorted(self.released)}"})
        if self.weights_lost:
            return 500, json.dumps({"error": "serving released weights that were never reloaded (garbage)"})
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        time.sleep(self.delay_s)
        with self.lock:
            self.inflight -= 1
        if self.mode == "crash_on_generate":
            os._exit(17)  # the server process dies while holding the request
        if self.mode == "error_500":
            return 500, json.dumps({"error": {"message": "CUDA out of memory while decoding"}})
        return 200, json.dumps({"output_ids": [1, 2]} if self.mode == "malformed" else fake_generation(body))


class DoubleHandler(BaseHTTPRequestHandler):
    state: DoubleState

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, text: str):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text.encode())))
        self.end_headers()
        self.wfile.write(text.encode())

    def do_GET(self):
        if self.path == "/model_info" and not self.state.dead:
            return self._reply(200, json.dumps({"weight_version": self.state.weight_version}))
        self._reply(200 if self.path == "/health" and self.state.mode != "never_healthy" else 503, "")

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._reply(*self.state.handle_post(self.path, json.loads(raw) if raw else None))


def double_server(state: DoubleState, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), type("Handler", (DoubleHandler,), {"state": state}))


def start_in_thread(state: DoubleState) -> tuple[ThreadingHTTPServer, str]:
    server = double_server(state)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def free_port(span: int = 1) -> int:
    """A port p such that p..p+span-1 are free right now, below the ephemeral range (spin_megatron/ports.py)."""
    return pick_free_port("127.0.0.1", span=span)


def pid_gone(pid: int, wait_s: float = 5.0) -> bool:
    """No such process, or a zombie waiting for its reaper (it holds no resources)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        if not status.exists() or "\nState:\tZ" in status.read_text():
            return True
        time.sleep(0.05)
    return False


# `python -m sglang.launch_server` and `python -m sglang_router.launch_router` resolve to these shims, which
# run this file's double
SHIM = f"""import runpy, sys
sys.argv = [{__file__!r}, "--spawn-child"] + sys.argv[1:]
runpy.run_path({__file__!r}, run_name="__main__")
"""
SHIMS = {"sglang/__init__.py": "", "sglang/launch_server.py": SHIM}
SHIMS |= {"sglang_router/__init__.py": "", "sglang_router/launch_router.py": SHIM}


def serve_double(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--double-mode", default="ok")
    parser.add_argument("--spawn-child", action="store_true")
    args, _ = parser.parse_known_args(argv)  # the real servers' other flags (--model-path, ...) are ignored
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}", flush=True)
    for name in sorted(os.environ):  # what the launcher added to the server's environment
        if name.startswith(("SGLANG_", "SPIN_TEST_")):
            print(f"env {name}={os.environ[name]}", flush=True)
    if args.double_mode == "exit_on_start":
        print(
            "RuntimeError: not enough memory for the model weights (the double's scripted failure)",
            flush=True,
        )
        sys.exit(3)
    if args.spawn_child:  # like SGLang's scheduler process: must not outlive the server (nor its death)
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=_die_with_parent
        )
        print(f"child pid {child.pid}", flush=True)
    double_server(DoubleState(mode=args.double_mode), args.host, args.port).serve_forever()


if __name__ == "__main__":
    serve_double(sys.argv[1:])
