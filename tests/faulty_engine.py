"""A rollout engine factory for fault tests: the real ``hf`` engine, made to die, hang or return garbage on
chosen generate calls. Used as ``rollout.engine=tests.faulty_engine:make`` with
``SPIN_TEST_ENGINE_FAULTS="die@2,hang@3,malformed@4"`` (1-based generate calls, counted over all engine
instances of the process, so restarts continue the count); ``die@2@1``: only on global rank 1."""

from __future__ import annotations

import dataclasses
import os
import time

from spin_megatron.rollout import build_engine

_CALLS = {"n": 0}


def _faults() -> dict[int, str]:
    spec, rank = os.environ.get("SPIN_TEST_ENGINE_FAULTS", ""), os.environ.get("RANK", "0")
    faults = {}
    for kind, call, *only in (part.split("@") for part in spec.split(",") if part):
        if not only or only[0] == rank:
            faults[int(call)] = kind
    return faults


class FaultyEngine:
    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompt_ids, params, prompt_keys=None):
        _CALLS["n"] += 1
        fault = _faults().get(_CALLS["n"])
        if fault == "die":
            raise RuntimeError("injected engine death")
        if fault == "hang":
            time.sleep(3600)
        samples = self.inner.generate(prompt_ids, params, prompt_keys)
        if fault == "malformed":
            samples[0].response_ids = [-5]
        return samples

    def __getattr__(self, name):
        return getattr(self.inner, name)


def make(cfg, source, groups):
    hf_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="hf"))
    return FaultyEngine(build_engine(hf_cfg, source, groups))
