"""Pushing to the Hub, against a local stand-in for the Hub's HTTP API: nothing here reaches the network.

FakeHub answers exactly the requests huggingface_hub makes for HfApi.create_repo(exist_ok=True) and
HfApi.upload_folder of small files (read in huggingface_hub 2.4's hf_api.py, _commit_api.py, _upload_pipeline.py):
    POST /api/repos/create                               the repo (its JSON body carries the visibility)
    GET  /api/models/{ns}/{name}[/revision/{rev}]        repo_info, which create_repo asks after a 401/403
    POST /api/validate-yaml                              the README.md's front matter, before any upload
    POST /api/models/{ns}/{name}/preupload/{rev}         upload modes: FakeHub says "regular" for every file,
                                                         so no LFS/Xet upload follows
    POST /api/models/{ns}/{name}/commit/{rev}            NDJSON: a header line, then one line per file, base64
Any other request is recorded as unexpected. The pushes run in a subprocess whose HF_ENDPOINT points at FakeHub
(huggingface_hub reads it once, at import), with its own empty HF_HOME and no offline or proxy settings.
"""
import base64
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from turbotune.errors import ConfigError
from turbotune.export import hub
from turbotune.export.hub import check_repo_id, model_card, staged_upload

TOKEN = "hf_fake_token_for_tests"
REPO = "alice/smol-copy"
PLACEHOLDER = "---\nlibrary_name: peft\n---\n# Model Card for Model ID\n\n- **Developed by:** [More Information Needed]\n"


# ---------------------------------------------------------------- the stand-in Hub

class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode="ok"):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = mode            # "ok" | "401" (token rejected) | "403" (may not create) | "read-only" (the
                                    # repo exists, 409 on create, and the token may not write to it: 403 on upload)
        self.requests = []          # (method, path, headers, body bytes)
        self.created = []           # JSON bodies of /api/repos/create
        self.validated = []         # README.md texts sent to /api/validate-yaml
        self.files = {}             # path in repo -> bytes, from the commits
        self.unexpected = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method):
        hub_ = self.server
        body = self._body()
        path = self.path.split("?")[0]
        hub_.requests.append((method, path, dict(self.headers), body))
        if hub_.mode == "401":
            return self._send(401, {"error": "Invalid credentials in Authorization header"},
                              {"X-Error-Message": "Invalid credentials in Authorization header"})
        parts = path.strip("/").split("/")
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "GET" and parts[:2] == ["api", "models"]:
            return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if method == "POST" and path == "/api/validate-yaml":
            hub_.validated.append(json.loads(body)["content"])
            return self._send(200, {"errors": [], "warnings": []})
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "preupload":
            if hub_.mode == "read-only":
                return self._send(403, {"error": "You don't have the rights to write to this repo"})
            files = json.loads(body)["files"]
            return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                               "oid": None} for f in files]})
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "commit":
            return self._commit(f"{parts[2]}/{parts[3]}", body)
        hub_.unexpected.append((method, self.path))
        return self._send(404, {"error": f"FakeHub does not serve {method} {self.path}"})

    def _create(self, payload):
        self.server.created.append(payload)
        if self.server.mode == "403":
            return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
        repo = f"{payload['organization']}/{payload['name']}"
        if self.server.mode == "read-only":  # the Hub's answer for an existing repo: 409, with its URL
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo}"})
        return self._send(200, {"url": f"{self.server.url}/{repo}", "name": repo, "id": "0" * 24})

    def _commit(self, repo, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert lines[0]["key"] == "header"
        for line in lines[1:]:
            assert line["key"] == "file" and line["value"]["encoding"] == "base64", line
            self.server.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = "a" * 40
        return self._send(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{oid}", "commitOid": oid,
                                "success": True})


@pytest.fixture
def fake_hub():
    server = FakeHub()
    yield server
    server.stop()


def closed_port_url() -> str:
    """The URL of a local port nobody listens on: a Hub that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


DRIVER = """
import json, sys
from turbotune.errors import TurbotuneError
from turbotune.export.hub import push_to_hub
kwargs = json.loads(sys.argv[1])
try:
    print(json.dumps({"url": push_to_hub(**kwargs)}))
except TurbotuneError as e:
    print(json.dumps({"error": str(e), "type": type(e).__name__}))
"""


def push(endpoint, tmp_path, token=TOKEN, extra_env=None, **kwargs) -> dict:
    """push_to_hub(**kwargs) in a fresh interpreter whose huggingface_hub talks to `endpoint` only."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN",
                                                              "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1,localhost",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", **(extra_env or {}))
    if token:
        env["HF_TOKEN"] = token
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(kwargs)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- a run folder, as training writes it

def make_run(root: Path, base="acme/tiny-base", data="/home/alice/private/copy.jsonl", load_in_4bit=False) -> Path:
    """A run folder laid out by turbotune's own writers (run_config.json, training_log.json) with an adapter
    checkpoint of small files; returns the run folder."""
    from turbotune.training.checkpoints import write_json_atomically
    from turbotune.training.config import TrainConfig
    from turbotune.training.log import write_log

    run = root / "run"
    ckpt = run / "last_checkpoint"
    ckpt.mkdir(parents=True)
    cfg = TrainConfig(model=base, data=data, output_dir=str(run), max_steps=4, lora_r=8, lora_alpha=16,
                      load_in_4bit=load_in_4bit)
    write_json_atomically(run / "run_config.json", cfg.to_dict())
    row = {"learning_rate": 1e-4, "memory_gib": 1.0, "memory_kind": "RSS", "tokens_per_s": 900.0}
    history = [{"step": 2, "loss": 2.5, "epoch": 0.5, **row}, {"step": 4, "loss": 1.2345, "epoch": 1.0, **row}]
    write_log(run, history, {"steps": 4, "skipped_nonfinite": 0, "peak_memory_gib": 1.5, "memory_kind": "RSS",
                             "last_checkpoint": str(ckpt)})
    (ckpt / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 8,
                                                          "peft_type": "LORA"}))
    (ckpt / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 12)
    (ckpt / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    (ckpt / "run_config.json").write_text(json.dumps(cfg.to_dict()))
    (ckpt / "README.md").write_text(PLACEHOLDER)  # what PEFT's save_pretrained leaves beside an adapter
    (ckpt / "trainer_state.pt").write_bytes(b"optimizer state")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "history": history, "config": cfg.to_dict()}))
    return run


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- pushes

def test_push_uploads_every_file_and_a_card(fake_hub, tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    before = snapshot(adapter)
    result = push(fake_hub.url, tmp_path, folder=adapter, repo_id=REPO, private=True)

    assert result == {"url": f"{fake_hub.url}/{REPO}"}, result
    assert fake_hub.unexpected == []
    assert len(fake_hub.created) == 1 and fake_hub.created[0]["name"] == "smol-copy" \
        and fake_hub.created[0]["organization"] == "alice"
    assert fake_hub.created[0].get("visibility") == "private" or fake_hub.created[0].get("private") is True
    assert [{k.lower(): v for k, v in h.items()}.get("authorization") for _, _, h, _ in fake_hub.requests] == \
        [f"Bearer {TOKEN}"] * 4  # create, validate-yaml, preupload, commit

    shared = {k: v for k, v in before.items() if k not in ("README.md", "trainer_state.pt", "trainer_state.json")}
    assert {k: v for k, v in fake_hub.files.items() if k != "README.md"} == shared  # exact bytes, nothing else
    card = fake_hub.files["README.md"].decode()
    assert fake_hub.validated == [card]
    assert 'base_model: "acme/tiny-base"' in card and "library_name: peft" in card and "- turbotune" in card
    assert "Final loss: **1.2345** at step 4" in card and "[More Information Needed]" not in card
    assert "/home/alice" not in card and "copy.jsonl" in card
    assert snapshot(adapter) == before  # the folder was only read


def test_a_folder_with_its_own_card_keeps_it(fake_hub, tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    (adapter / "README.md").write_text("---\nlicense: mit\n---\n# My adapter\n")
    result = push(fake_hub.url, tmp_path, folder=adapter, repo_id=REPO)
    assert "url" in result, result
    assert fake_hub.files["README.md"] == b"---\nlicense: mit\n---\n# My adapter\n"
    assert "visibility" not in fake_hub.created[0] or fake_hub.created[0]["visibility"] != "private"


def test_token_rejected_says_log_in(tmp_path):
    server = FakeHub(mode="401")
    try:
        adapter = make_run(tmp_path) / "last_checkpoint"
        result = push(server.url, tmp_path, folder=adapter, repo_id=REPO)
    finally:
        server.stop()
    message = result["error"]
    assert "401" in message and "hf auth login" in message and "HF_TOKEN" in message, message
    assert "nothing was uploaded" in message
    assert server.files == {}


def test_no_token_says_log_in_before_any_request(fake_hub, tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    result = push(fake_hub.url, tmp_path, token=None, folder=adapter, repo_id=REPO)
    assert "not logged in" in result["error"] and "hf auth login" in result["error"], result
    assert fake_hub.requests == []


def _push_without_write_access(tmp_path, mode):
    """A push to someone else's repo through a fake Hub in `mode`; (the error message, the server)."""
    server = FakeHub(mode=mode)
    try:
        adapter = make_run(tmp_path) / "last_checkpoint"
        result = push(server.url, tmp_path, folder=adapter, repo_id="someone-else/their-repo")
    finally:
        server.stop()
    return result["error"], server


def test_no_write_access_says_permission(tmp_path):
    message, server = _push_without_write_access(tmp_path, "403")
    assert "no permission to write to someone-else/their-repo" in message and "403" in message, message
    assert "write access" in message and server.files == {}


def test_existing_repo_without_write_access(tmp_path):
    message, server = _push_without_write_access(tmp_path, "read-only")
    assert "no permission to write to someone-else/their-repo" in message and "did not complete" in message, message
    assert server.files == {} and server.unexpected == []


def test_hub_down_says_offline_and_leaves_the_folder(tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    before = snapshot(adapter)
    result = push(closed_port_url(), tmp_path, folder=adapter, repo_id=REPO)
    message = result["error"]
    assert "could not reach the Hugging Face Hub" in message, message
    assert "nothing was uploaded" in message and "intact" in message and str(adapter) in message
    assert snapshot(adapter) == before


def test_offline_mode_is_named(fake_hub, tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    result = push(fake_hub.url, tmp_path, extra_env={"HF_HUB_OFFLINE": "1"}, folder=adapter, repo_id=REPO)
    assert "HF_HUB_OFFLINE" in result["error"] and "nothing was uploaded" in result["error"], result
    assert fake_hub.requests == []


def test_malformed_repo_id_fails_before_any_request(fake_hub, tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    result = push(fake_hub.url, tmp_path, folder=adapter, repo_id="alice/bad--name", card="# mine\n")
    assert result["type"] == "ConfigError" and "USER/NAME" in result["error"], result
    assert fake_hub.requests == []


@pytest.mark.parametrize("bad", ["smol-copy", "alice/", "/smol", "a/b/c", "alice/-x", "alice/x.", "alice/a..b",
                                 "alice/x.git", "alice/sp ace", "", "alice/" + "x" * 97])
def test_repo_id_check(bad):
    with pytest.raises(ConfigError, match="Nothing was uploaded"):
        check_repo_id(bad)


def test_repo_id_check_accepts_and_explains_urls():
    assert check_repo_id(" alice/smol_copy-v1.2 ") == "alice/smol_copy-v1.2"
    with pytest.raises(ConfigError, match="pass 'alice/smol'"):
        check_repo_id("https://huggingface.co/alice/smol")


# ---------------------------------------------------------------- cards and the staged upload, without a server

def test_card_of_a_merged_export_reads_the_run(tmp_path):
    run = make_run(tmp_path, load_in_4bit=True)
    merged = tmp_path / "exports" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (merged / "model.safetensors").write_bytes(b"\x00" * 64)
    (merged / hub.MERGE_REPORT).write_text(json.dumps({
        "merged_into": "nf4", "trained_on": "nf4", "dtype": "bfloat16", "probe_tokens": 32,
        "logits_max_abs_diff": 0.0123, "logits_relative_diff": 0.0004}))
    card = model_card(merged, run_dir=hub.run_folder_of(run / "last_checkpoint"), repo_id=REPO)  # as the CLI does
    assert 'base_model: "acme/tiny-base"' in card and "library_name: transformers" in card
    assert "- qlora" in card and "4-bit NF4 base, dequantised" in card and "0.0123" in card
    assert "Final loss: **1.2345**" in card and 'pipeline("text-generation", model="alice/smol-copy")' in card
    assert model_card(merged, run_dir=run, repo_id=REPO) == card and hub.run_folder_of(tmp_path) is None
    without_run = model_card(merged)  # exports/ holds no run: the card says so rather than guessing
    assert "base_model:" not in without_run and "not found" in without_run


def test_card_of_a_gguf_export(tmp_path):
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model-q8_0.gguf").write_bytes(b"GGUF")
    (gguf / hub.MERGE_REPORT).write_text(json.dumps({"merged_into": "original", "trained_on": "original",
                                                      "gguf_file": "model-q8_0.gguf", "gguf_quant": "q8_0"}))
    card = model_card(gguf, run_dir=make_run(tmp_path, base=None))
    assert "library_name: gguf" in card and "- gguf" in card and "llama-cli -m model-q8_0.gguf" in card
    assert f'base_model: "{hub.DEFAULT_BASE_HUB_ID}"' in card and "Q4_1" in card  # the embedded default base
    assert "Modelfile" not in card
    (gguf / "Modelfile").write_text("FROM ./model-q8_0.gguf\n")  # `turbotune export --how ollama`
    assert "ollama create NAME -f Modelfile" in model_card(gguf)


def test_card_from_a_local_base_names_no_base_model(tmp_path):
    run = make_run(tmp_path, base=str(tmp_path / "models" / "my-llama"))
    card = model_card(run / "last_checkpoint")
    assert "base_model:" not in card and "a local model folder named my-llama" in card
    assert str(tmp_path) not in card and "BASE_MODEL" in card


def test_run_dir_without_a_run_is_an_error(tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    with pytest.raises(ConfigError, match="turbotune train"):
        model_card(adapter, run_dir=tmp_path / "elsewhere")


def test_not_an_export_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="turbotune export"):
        model_card(tmp_path)


def test_staged_upload_links_and_reads_only(tmp_path):
    adapter = make_run(tmp_path) / "last_checkpoint"
    before = snapshot(adapter)
    with staged_upload(adapter, "# card\n") as staged:
        seen = snapshot(staged)
    assert seen.pop("README.md") == b"# card\n"
    assert seen == {k: v for k, v in before.items() if k not in ("README.md",) + hub.LOCAL_ONLY}
    assert not staged.exists() and snapshot(adapter) == before


def test_the_card_reads_what_training_writes(tiny_llama_dir, tmp_path, fake_hub):
    """A real two-step run and `turbotune export --how adapter`, pushed: the card's numbers are the log's, and
    PEFT's placeholder README.md is replaced."""
    from turbotune.cli.train import run_training
    from turbotune.export.export import export
    from turbotune.training.config import TrainConfig

    cfg = TrainConfig(model=str(tiny_llama_dir), output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2,
                      grad_accum=1, max_seq_length=64, lora_r=4, lr=1e-2, logging_steps=1)
    run_training(cfg, progress=False)
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    copy = export(tmp_path / "run" / "last_checkpoint", tmp_path / "export", how="adapter")
    assert hub.is_placeholder_card((copy / "README.md").read_text())

    result = push(fake_hub.url, tmp_path, folder=copy, repo_id=REPO, run_dir=tmp_path / "run")
    assert "url" in result, result
    card = fake_hub.files["README.md"].decode()
    assert f"Final loss: **{log['history'][-1]['loss']:.4f}** at step 2" in card
    assert "| LoRA rank r / alpha | 4 / 4 |" in card and str(tmp_path) not in card
    assert {k: v for k, v in fake_hub.files.items() if k != "README.md"} == \
        {k: v for k, v in snapshot(copy).items() if k != "README.md"}
