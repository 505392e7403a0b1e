"""The SGLang reward-model backend (spin_megatron/reward_model/sglang.py).

- unit: config checks, the launch command, rendering with the reward model's tokenizer and template, the
  length refusal, response parsing, and scoring against a small /classify double (round-robin over URLs,
  micro-batches, order, one-line errors naming the server on HTTP errors, timeouts, malformed answers);
- contract (.venv-sglang): our /classify bodies posted to SGLang 0.5.23's own FastAPI route, normalized by its
  ``EmbeddingReqInput``, answered through its LAST pooler and embedding conversion, and parsed by our parser
  (tests/sglang_side/reward_contract_check.py);
- real server: a REAL SGLang 0.5.23 CPU server launched by the backend, serving a tiny random
  LlamaForSequenceClassification (num_labels=1, Qwen2.5 vocabulary), whose scores must equal transformers'
  AutoModelForSequenceClassification scores of the same conversations.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from spin_megatron.errors import ConfigError
from spin_megatron.ports import pick_free_port
from spin_megatron.reward_model.base import RewardModelError
from spin_megatron.reward_model.sglang import (
    REWARD_SERVER_FLAGS,
    RewardSGLangConfig,
    SGLangRewardModel,
    build_reward_server_command,
    build_reward_server_env,
    build_sglang_reward_model,
    classify_payload,
    parse_classify_response,
    render_conversation_ids,
)
from spin_megatron.reward_model.sglang_checkpoint import add_zero_score_bias, missing_head_bias
from spin_megatron.rollout.sglang.server import PortTakenError
from tests.helpers import REPO

CHECK = REPO / "tests" / "sglang_side" / "reward_contract_check.py"
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "5, I think."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
    ],
    [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hello there! How can I help?"},
    ],
    [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1 2 3 4 5 6 7 8 9 10"}],
]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


# ----- config and command line ----------------------------------------------------------------------------
def test_config_defaults_and_lists_from_hydra():
    config = RewardSGLangConfig(urls=["http://a:1/", "http://b:2"], gpu_ids=[], extra_server_args=["--x"])
    assert config.urls == ("http://a:1/", "http://b:2") and config.extra_server_args == ("--x",)
    assert config.server_urls() == ["http://a:1", "http://b:2"] and not config.launches_servers
    assert RewardSGLangConfig(base_port=40000, num_engines=2).server_urls() == [
        "http://127.0.0.1:40000",
        "http://127.0.0.1:40001",
    ]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_engines=0), "num_engines"),
        (dict(max_inflight_requests=0), "max_inflight_requests"),
        (dict(timeout_s=0), "timeout_s"),
        (dict(health_timeout_s=-1), "health_timeout_s"),
        (dict(mem_fraction_static=1.0), "mem_fraction_static"),
        (dict(dtype="fp8"), "dtype"),
        (dict(urls=("localhost:30000",)), "urls"),
        (dict(urls=("http://a:1", "http://b:2"), num_engines=3), "num_engines"),
        (dict(base_port=65535, num_engines=2), "base_port"),
        (dict(gpu_ids=(0,), num_engines=2), "gpu_ids"),
        (dict(gpu_ids=(1, 1)), "gpu_ids"),
    ],
)
def test_config_refuses_bad_values_naming_the_key(overrides, field):
    with pytest.raises(ConfigError, match=rf"reward_model\.sglang\.{field} "):
        RewardSGLangConfig(**overrides)


def test_launch_command_is_the_rollout_servers_plus_is_embedding():
    config = RewardSGLangConfig(
        num_engines=2, tp_size=2, gpu_ids=(4, 5, 6, 7), base_port=41000, dtype="bfloat16",
        mem_fraction_static=0.5, python_executable="/py", extra_server_args=("--context-length", "8192"),
        extra_server_env={"A": 1},
    )  # fmt: skip
    command = build_reward_server_command("/models/rm", config, 1)
    assert command[:5] == ["/py", "-m", "sglang.launch_server", "--model-path", "/models/rm"]
    flags = " ".join(command)
    for expected in ("--tp-size 2", "--port 41001", "--dtype bfloat16", "--mem-fraction-static 0.5"):
        assert expected in flags
    assert "--is-embedding" in command and REWARD_SERVER_FLAGS == ("--is-embedding",)
    assert "--skip-tokenizer-init" in command and "--base-gpu-id" not in command
    assert command[-2:] == ["--context-length", "8192"]  # the user's arguments come last: they win
    env = build_reward_server_env("/models/rm", config, 1, {"PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "6,7" and env["A"] == "1" and env["PATH"] == "/bin"
    no_skip = RewardSGLangConfig(skip_tokenizer_init=False)
    assert "--skip-tokenizer-init" not in build_reward_server_command("/m", no_skip, 0)


# ----- rendering ------------------------------------------------------------------------------------------
def test_rendering_uses_the_reward_models_template_without_extra_special_tokens(qwen_tokenizer):
    conversation = CONVERSATIONS[0]
    ids = render_conversation_ids(qwen_tokenizer, conversation)
    assert ids == list(qwen_tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))
    text = qwen_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("4<|im_end|>\n")
    override = render_conversation_ids(qwen_tokenizer, conversation, TEMPLATE)
    assert qwen_tokenizer.decode(override) == "<user>What is 2 + 2?\n<assistant>4\n"


def _attached(tokenizer, urls, *, path="unused", **kwargs) -> SGLangRewardModel:
    config = RewardSGLangConfig(urls=tuple(urls), timeout_s=kwargs.pop("timeout_s", 5.0))
    return SGLangRewardModel(path, config=config, tokenizer=tokenizer, **kwargs)


def test_encode_cuts_long_and_refuses_malformed_conversations(qwen_tokenizer, tmp_path):
    template_file = tmp_path / "rm.jinja"
    template_file.write_text(TEMPLATE)
    model = _attached(qwen_tokenizer, ["http://127.0.0.1:9"], chat_template=str(template_file), max_length=16)
    assert model.chat_template == TEMPLATE
    assert model.encode(CONVERSATIONS[:1]) == [
        render_conversation_ids(qwen_tokenizer, CONVERSATIONS[0], TEMPLATE)
    ]
    long = render_conversation_ids(qwen_tokenizer, CONVERSATIONS[4], TEMPLATE)
    assert len(long) > 16  # cut to its last max_length tokens, as the hf backend does
    assert model.encode([CONVERSATIONS[0], CONVERSATIONS[4]])[1] == long[-16:] and model.cuts.truncated == 1
    with pytest.raises(ValueError, match="must end with it"):
        model.encode([CONVERSATIONS[0][:1]])
    with pytest.raises(ValueError, match="conversation 0 is not a non-empty list"):
        model.encode([[{"role": "user"}]])
    model.shutdown()
    model.shutdown()  # idempotent
    with pytest.raises(RewardModelError, match="after shutdown"):
        model.score_ids([[1]])


def test_a_tokenizer_without_a_chat_template_needs_one_from_the_config(qwen_tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="reward_model.chat_template"):
        _attached(NoTemplate(), ["http://127.0.0.1:9"])
    _attached(NoTemplate(), ["http://127.0.0.1:9"], chat_template=TEMPLATE).shutdown()


# ----- responses ------------------------------------------------------------------------------------------
def _result(*values):
    return {
        "embedding": list(values),
        "meta_info": {"id": "x", "finish_reason": {"type": "length", "length": 0}},
    }


def test_parse_classify_response():
    assert parse_classify_response([_result(1.5), _result(-2)], 2, "u") == [1.5, -2.0]
    cases = [
        ([_result(1.0)], 2, "expected a list of 2 results, got 1"),
        ({"error": "x"}, 2, "expected a list of 2 results, got dict"),
        (_result(1.0), 1, "expected a list of 1 results, got dict"),  # we send batches: a list comes back
        ([{"meta_info": {}}], 1, "a result without 'embedding'"),
        ([_result("1")], 1, "not a list of numbers"),
        ([_result(1.0, 2.0)], 1, "returns 2 values per conversation, not one scalar"),
        ([_result(math.nan)], 1, "non-finite score"),
        ([{"meta_info": {"finish_reason": {"type": "abort", "message": "out of\nmemory"}}}], 1, "aborted"),
    ]
    for body, expected, message in cases:
        with pytest.raises(RewardModelError, match=message) as info:
            parse_classify_response(body, expected, "reward model server http://h:1/classify")
        assert "http://h:1/classify" in str(info.value) and "\n" not in str(info.value)


# ----- scoring against a /classify double -----------------------------------------------------------------
class ClassifyDouble:
    """Answers /classify like SGLang (a list of {"embedding": [score], "meta_info"}), score = f(ids); or fails
    as told: ``mode`` = ok | http500 | malformed | slow."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.batches = mode, []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                double.batches.append(body["input_ids"])
                if double.mode == "slow":
                    time.sleep(1.5)
                if double.mode == "http500":
                    status, answer = 500, {"error": {"message": "boom"}}
                elif double.mode == "malformed":
                    status, answer = 200, {"embedding": [1.0]}
                else:
                    status, answer = 200, [_result(self.server.score(ids)) for ids in body["input_ids"]]
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (the timeout case)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.score = self.score
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @staticmethod
    def score(ids):
        return sum(ids) % 1000 / 10 - len(ids)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def doubles():
    made = []

    def make(mode="ok"):
        made.append(ClassifyDouble(mode))
        return made[-1]

    yield make
    for double in made:
        double.close()


def test_scores_come_back_in_order_from_micro_batches_spread_over_the_servers(qwen_tokenizer, doubles):
    first, second = doubles(), doubles()
    model = _attached(qwen_tokenizer, [first.url, second.url], micro_batch_size=2)
    ids = model.encode(CONVERSATIONS)
    assert model.score(CONVERSATIONS) == [ClassifyDouble.score(row) for row in ids]
    # 5 conversations in batches of 2: batches 0 and 2 to the first server, batch 1 to the second
    # (requests to one server are in flight together: their arrival order is not fixed)
    assert sorted(first.batches) == sorted([ids[0:2], ids[4:5]]) and second.batches == [ids[2:4]]
    model.score(CONVERSATIONS[:1])  # round-robin continues across calls: batch 3 goes to the second server
    assert second.batches[-1] == ids[:1]
    assert model.score([]) == []
    model.shutdown()


@pytest.mark.parametrize(
    "mode, message",
    [
        ("http500", r"http://127.0.0.1:\d+/classify answered HTTP 500: .*boom"),
        ("malformed", r"http://127.0.0.1:\d+/classify: malformed /classify response"),
        (
            "slow",
            r"http://127.0.0.1:\d+/classify: no answer within 0.5 s \(raise reward_model.sglang.timeout_s",
        ),
    ],
)
def test_server_failures_raise_one_line_naming_the_server(qwen_tokenizer, doubles, mode, message):
    good, bad = doubles(), doubles(mode)
    model = _attached(qwen_tokenizer, [good.url, bad.url], micro_batch_size=1, timeout_s=0.5)
    with pytest.raises(RewardModelError, match=message) as info:
        model.score(CONVERSATIONS[:4])
    text = str(info.value)
    assert bad.url in text and good.url not in text and "\n" not in text
    assert "(and 1 more request(s) failed)" in text  # batches 1 and 3 both went to the failing server
    model.shutdown()


def test_built_from_the_reward_model_section(qwen_tokenizer_dir, doubles):
    from types import SimpleNamespace

    server = doubles()
    cfg = SimpleNamespace(
        path=str(qwen_tokenizer_dir), tokenizer_path=None, chat_template=TEMPLATE, max_length=64,
        micro_batch_size=3, sglang={"urls": [server.url], "timeout_s": 7},
    )  # fmt: skip
    with build_sglang_reward_model(cfg) as model:
        assert (model.max_length, model.micro_batch_size, model.chat_template) == (64, 3, TEMPLATE)
        assert model.urls == [server.url] and model.config.timeout_s == 7
        assert len(model.score(CONVERSATIONS)) == 5 and len(server.batches) == 2


def test_a_dead_server_is_named(qwen_tokenizer):
    url = f"http://127.0.0.1:{pick_free_port()}"
    model = _attached(qwen_tokenizer, [url])
    with pytest.raises(RewardModelError, match=rf"{url}/classify: connection failed"):
        model.score(CONVERSATIONS[:1])
    model.shutdown()


# ----- launching ------------------------------------------------------------------------------------------
def test_a_taken_port_and_a_server_that_dies_at_launch(qwen_tokenizer, doubles, tmp_path, monkeypatch):
    monkeypatch.setattr("spin_megatron.reward_model.sglang.PORT_RELEASE_WAIT_S", 0.2)
    taken = int(doubles().url.rsplit(":", 1)[1])
    config = RewardSGLangConfig(base_port=taken, log_dir=str(tmp_path))
    with pytest.raises(PortTakenError, match=rf"port {taken} .*reward_model.sglang.base_port"):
        SGLangRewardModel("/m", config=config, tokenizer=qwen_tokenizer)
    # an interpreter that exits at once: reported with its log, nothing left running
    config = RewardSGLangConfig(
        base_port=pick_free_port(), python_executable="/bin/false", log_dir=str(tmp_path)
    )
    with pytest.raises(RewardModelError, match="reward model server at .* died before becoming healthy"):
        SGLangRewardModel("/m", config=config, tokenizer=qwen_tokenizer)
    log = (tmp_path / "reward_server_0.log").read_text()
    assert "sglang.launch_server --model-path /m" in log and "--is-embedding" in log


# ----- checkpoints SGLang misreads: Qwen2/Qwen3ForSequenceClassification without score.bias ----------------
@pytest.mark.parametrize("sharded", [False, True])
def test_a_qwen2_head_without_bias_is_refused_until_a_zero_bias_is_added(
    qwen_tokenizer, tmp_path, capsys, sharded
):
    from transformers import AutoModelForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=300, num_labels=1, pad_token_id=0, architectures=["Qwen2ForSequenceClassification"],
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = tmp_path / "qwen2_rm"
    Qwen2ForSequenceClassification(config).save_pretrained(
        model_dir, max_shard_size="20KB" if sharded else "1GB"
    )
    assert (model_dir / "model.safetensors.index.json").is_file() == sharded
    ids = torch.tensor([[5, 6, 7, 8]])
    before = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()(input_ids=ids).logits

    why = missing_head_bias(str(model_dir))
    assert "without score.bias" in why and "sgl-project/sglang#38768" in why and "add_zero_score_bias" in why
    launching = RewardSGLangConfig(base_port=pick_free_port())
    with pytest.raises(ConfigError, match="without score.bias"):  # before any server starts
        SGLangRewardModel(str(model_dir), config=launching, tokenizer=qwen_tokenizer)
    _attached(qwen_tokenizer, ["http://127.0.0.1:9"], path=str(model_dir)).shutdown()  # attached: a warning
    assert "warning: " in capsys.readouterr().err

    add_zero_score_bias(str(model_dir))
    assert missing_head_bias(str(model_dir)) is None
    after = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()(input_ids=ids).logits
    assert torch.equal(before, after)  # transformers ignores the zero bias
    assert missing_head_bias(str(tmp_path)) is None  # no config.json: nothing to say


# ----- contract: SGLang 0.5.23's own /classify route --------------------------------------------------------
BAD_BODIES = [{"inputs_ids": [[1, 2]]}, {"input_ids": "12"}, {"text": "hi", "input_ids": [1]}]


@pytest.fixture(scope="module")
def contract(sglang_python, qwen_tokenizer, tmp_path_factory):
    """(our batches, the side script's report on our bodies followed by BAD_BODIES): one SGLang import."""
    model = _attached(qwen_tokenizer, ["http://127.0.0.1:9"])
    ids = model.encode(CONVERSATIONS)
    model.shutdown()
    batches = [ids[:3], ids[3:], ids[:1]]  # a batch of one is still a list of lists: the answer is a list
    path = tmp_path_factory.mktemp("contract") / "requests.json"
    bodies = [classify_payload(batch) for batch in batches] + BAD_BODIES
    path.write_text(json.dumps({"requests": bodies, "hidden_size": 16}))
    result = subprocess.run(
        [str(sglang_python), str(CHECK), str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return batches, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.sglang_real
def test_our_requests_pass_sglangs_classify_route_and_we_parse_its_answers(contract):
    batches, report = contract
    for batch, entry in zip(batches, report[: len(batches)], strict=True):
        assert entry["status"] == 200, entry["body"]
        assert entry["unknown_keys"] == []
        assert entry["normalized"] == {"batch_size": len(batch), "is_single": False, "input_ids": batch}
        scores = parse_classify_response(json.loads(entry["body"]), len(batch), "contract")
        assert scores == pytest.approx(entry["expected"], abs=1e-5)
        assert len(set(scores)) == len(scores)  # one score per conversation, each from its own last token


@pytest.mark.sglang_real
def test_the_reward_contract_check_rejects_what_sglang_rejects(contract):
    batches, report = contract
    bad = report[len(batches) :]
    assert [entry["status"] for entry in bad] == [400, 400, 400]
    assert bad[0]["unknown_keys"] == ["inputs_ids"]
    assert "cannot be provided at the same time" in bad[2]["body"]


# ----- a real SGLang 0.5.23 CPU server against transformers ------------------------------------------------
def make_tiny_reward_model(out_dir, tokenizer_dir):
    """A random LlamaForSequenceClassification (num_labels=1) with the Qwen2.5 vocabulary and tokenizer; its head
    is scaled up so that the scores are O(1) and far apart."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from spin_megatron.models.hf_io import copy_tokenizer_files

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.05,
        tie_word_embeddings=False, num_labels=1, pad_token_id=151643, bos_token_id=None, eos_token_id=151645,
        architectures=["LlamaForSequenceClassification"],
    )  # fmt: skip
    torch.manual_seed(11)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


@torch.no_grad()
def transformers_scores(model_dir, ids_list):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [float(model(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in ids_list]


@pytest.mark.sglang_real
@pytest.mark.slow
def test_a_real_sglang_server_scores_like_transformers(sglang_python, qwen_tokenizer_dir, tmp_path):
    from tests.sglang_real_server import CPU_SERVER_ARGS, CPU_SERVER_ENV

    model_dir = make_tiny_reward_model(tmp_path / "rm", qwen_tokenizer_dir)
    config = RewardSGLangConfig(
        python_executable=str(sglang_python), dtype="float32", base_port=pick_free_port(), health_timeout_s=240,
        timeout_s=120, log_dir=str(tmp_path / "logs"), extra_server_args=CPU_SERVER_ARGS,
        extra_server_env=CPU_SERVER_ENV,
    )  # fmt: skip
    start = time.monotonic()
    with SGLangRewardModel(str(model_dir), config=config, micro_batch_size=2) as launched:
        scores = launched.score(CONVERSATIONS)
        reference = transformers_scores(model_dir, launched.encode(CONVERSATIONS))
        assert scores == pytest.approx(reference, abs=1e-4)
        assert max(reference) - min(reference) > 0.1  # the comparison can tell conversations apart
        # the same conversations again (now prefix-cache hits), split over two "servers" (the same one twice)
        urls = (launched.urls[0], launched.urls[0])
        with SGLangRewardModel(
            str(model_dir), config=RewardSGLangConfig(urls=urls, timeout_s=120), micro_batch_size=1
        ) as attached:
            assert attached.score(CONVERSATIONS) == pytest.approx(reference, abs=1e-4)
        process = next(iter(launched._processes.values()))
    assert process.exit_code() is not None  # shutdown stopped the server it launched
    assert time.monotonic() - start < 180
