"""Pushing an exported folder to the Hugging Face Hub: a LoRA adapter, a merged 16-bit model or a GGUF, with a card.

`push_to_hub(folder, "user/name")` checks the repo id, finds a token, creates the repo (an existing one is reused)
and uploads the folder with huggingface_hub's `HfApi.upload_folder`. The folder itself is never written to: the
upload is read from a temporary folder of links to its files, plus a model card (README.md) when the folder has no
card of its own (PEFT's placeholder card, full of "[More Information Needed]", counts as none). Training-resume
state (trainer_state.*) stays local, as `turbotune export --how adapter` leaves it out too.

`model_card(folder, run_dir)` writes that card from what turbotune saved, nothing else: adapter_config.json, the
run folder's run_config.json and training_log.json (training/log.py), a checkpoint's trainer_state.json, an
export's turbotune_merge.json. Local paths stay out of it: a data file or a local base model is named, not located.

Failures say what happened, whether anything reached the Hub, and what to do: not logged in, a token the Hub
rejects (401), no write access (403), the Hub unreachable or HF_HUB_OFFLINE set, a malformed repo id (checked
before any request).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from turbotune.errors import ConfigError, TurbotuneError
from turbotune.model.default_model import DEFAULT_MODEL_NAME, is_default_alias

# The files turbotune writes (named here rather than imported: those modules import torch, pushing needs none).
LOG_FILE = "training_log.json"          # training/log.py write_log: {"history": [rows], "summary": {...}}
RUN_CONFIG = "run_config.json"          # the run's TrainConfig, in the run folder and in last_checkpoint/
TRAINER_STATE = "trainer_state.json"    # a checkpoint's step, epoch, history and config (training/checkpoints.py)
MERGE_REPORT = "turbotune_merge.json"   # export.py: what a merged or GGUF export merged into, its logit check
LAST_CHECKPOINT = "last_checkpoint"
LOCAL_ONLY = ("trainer_state.pt", "trainer_state.json")  # optimizer/RNG state for --resume: not for sharing
PLACEHOLDER_MARK = "[More Information Needed]"           # huggingface_hub's card template, which PEFT writes

# turbotune's embedded default model is SmolLM2-135M-Instruct (model/default_model.py), read from a Q4_1 GGUF.
DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
REPO_ID_RE = re.compile(rf"({_PART})/({_PART})")
REPO_ID_HINT = ("a Hub repo id is USER/NAME or ORG/NAME: letters, digits, '-', '_' and '.', at most 96 characters "
                "a side, not starting or ending with '-' or '.', e.g. alice/smollm2-copywriter")
LOGIN_HINT = ("Log in with `hf auth login` (`huggingface-cli login` with huggingface_hub older than 1.0) and a token "
              "that can write (https://huggingface.co/settings/tokens), or set HF_TOKEN=hf_..., then run the same "
              "command again")

LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
WHAT = {"adapter": "LoRA adapter", "merged": "merged model", "gguf": "GGUF model"}


# ---------------------------------------------------------------- checks that need no network

def check_repo_id(repo_id) -> str:
    """`repo_id` stripped, or ConfigError saying what a repo id looks like. Runs before any request."""
    text = str(repo_id or "").strip()
    url = re.match(r"^(?:https?://(?:www\.)?huggingface\.co/|hf://)(?:models/)?([^/\s]+/[^/\s]+?)/?$", text)
    if url:
        raise ConfigError(f"{text!r} is a URL, not a repo id; pass {url.group(1)!r}. Nothing was uploaded.")
    if "/" not in text and text:
        raise ConfigError(f"{text!r} has no namespace: {REPO_ID_HINT} (your user name or an organisation before "
                          "the '/'). Nothing was uploaded.")
    if not REPO_ID_RE.fullmatch(text) or "--" in text or ".." in text or text.endswith(".git"):
        raise ConfigError(f"{text!r} is not a Hub repo id: {REPO_ID_HINT}. Nothing was uploaded.")
    return text


def folder_kind(folder) -> str:
    """'adapter', 'gguf' or 'merged', from the files an export writes; ConfigError for any other folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist or is not a folder: push the folder `turbotune export` wrote "
                          "(its --out)")
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if any(folder.glob("*.gguf")):
        return "gguf"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "merged"
    raise ConfigError(f"{folder} is not an exported model (no adapter_config.json, *.gguf, or config.json with "
                      "*.safetensors): write one with `turbotune export --adapter RUN/last_checkpoint --out DIR "
                      "--how adapter|merged|gguf` and push DIR")


def is_placeholder_card(text: str) -> bool:
    """A README.md that is the empty model-card template (PEFT's save_pretrained writes one beside every adapter)."""
    return PLACEHOLDER_MARK in text


def stays_local(relative: Path) -> bool:
    """Files the upload leaves out: training-resume state, and the leftovers of an interrupted atomic write."""
    if relative.name in LOCAL_ONLY:
        return True
    return any(part.startswith(".") and (".tmp-" in part or ".old-" in part) for part in relative.parts)


# ---------------------------------------------------------------- the push

def push_to_hub(folder, repo_id, private=False, token=None, commit_message=None, card=None, run_dir=None) -> str:
    """Upload an exported folder to the Hub model repo `repo_id` (created if needed); returns the repo's URL.

    The upload's README.md: `card` when given; else the folder's own card, unless it is a placeholder; else
    model_card(folder, run_dir). `private=True` makes a new repo private (an existing repo keeps its visibility;
    without it a new repo follows the namespace's default, public for users). `token`: else HF_TOKEN or the
    token `hf auth login` saved."""
    repo_id = check_repo_id(repo_id)
    folder = Path(folder).expanduser().resolve()
    kind = folder_kind(folder)
    readme = _upload_readme(folder, card, run_dir, repo_id)
    hub = _huggingface_hub()
    token = token or hub.get_token()
    if not token:
        raise TurbotuneError(f"not logged in to the Hugging Face Hub, so nothing was uploaded and {folder} is "
                             f"intact. {LOGIN_HINT}")
    api = hub.HfApi(token=token)
    created = False
    try:
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        created = True
        with staged_upload(folder, readme) as staged:
            api.upload_folder(repo_id=repo_id, folder_path=str(staged), repo_type="model",
                              commit_message=commit_message or f"Upload {WHAT[kind]} {folder.name} (turbotune)")
    except Exception as e:  # noqa: BLE001 - only the failures explain_hub_error recognises are translated
        explained = explain_hub_error(e, repo_id, folder, api.endpoint, created)
        if explained is None:
            raise
        raise explained from e
    return str(url)


def _upload_readme(folder: Path, card, run_dir, repo_id: str) -> str | None:
    """The README.md to upload instead of the folder's, or None to upload the folder's own card as it is."""
    if card is not None:
        return str(card)
    own = folder / "README.md"
    if own.is_file() and not is_placeholder_card(own.read_text(encoding="utf-8", errors="replace")):
        return None
    return model_card(folder, run_dir=run_dir, repo_id=repo_id)


@contextmanager
def staged_upload(folder: Path, readme: str | None):
    """A temporary folder that holds `folder` as it is to be uploaded: links to its files (copies where links are
    not possible), less what stays local, with `readme` as README.md when given. `folder` is only read."""
    staged = Path(tempfile.mkdtemp(prefix="turbotune-push-"))
    try:
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder)
            if not src.is_file() or stays_local(rel) or (readme is not None and rel.as_posix() == "README.md"):
                continue
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            _link(src.resolve(), staged / rel)
        if readme is not None:
            (staged / "README.md").write_text(readme, encoding="utf-8")
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # removes the links, never what they point to


def _link(src: Path, dest: Path) -> None:
    for make_link in (os.symlink, os.link):
        try:
            make_link(src, dest)
            return
        except (OSError, NotImplementedError):
            continue
    shutil.copy2(src, dest)


def _huggingface_hub():
    try:
        return importlib.import_module("huggingface_hub")
    except ImportError as e:
        raise TurbotuneError("pushing to the Hub needs huggingface_hub: pip install huggingface_hub") from e


# ---------------------------------------------------------------- what went wrong, in words

def connection_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the Hub could not be reached". huggingface_hub 2.x sends its requests with httpx2,
    1.x with httpx, 0.x with requests: each one's transport errors, whichever are installed, plus the built-in
    ConnectionError and TimeoutError (huggingface_hub's OfflineModeIsEnabled is a ConnectionError)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, name) for name in names if isinstance(getattr(mod, name, None), type)]
    return tuple(found)


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _server_says(error: BaseException) -> str:
    said = getattr(error, "server_message", None) or str(error)
    lines = [line.strip() for line in str(said).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def explain_hub_error(error, repo_id: str, folder: Path, endpoint: str, created: bool) -> TurbotuneError | None:
    """The error to show for a failed push, or None for a failure this module does not recognise (re-raised)."""
    if created:
        state = (f"the upload to {repo_id} did not complete (anything committed before the failure stays there) "
                 f"and {folder} is intact")
    else:
        state = f"nothing was uploaded and {folder} is intact"
    status = _status_code(error)
    if status == 401:
        return TurbotuneError(f"the Hub at {endpoint} rejected the token (HTTP 401: not logged in, or the token is "
                              f"invalid or expired): {state}. {LOGIN_HINT}")
    if status == 403:
        return TurbotuneError(f"no permission to write to {repo_id} (HTTP 403: {_server_says(error)}): {state}. Use "
                              "a token with write access to that namespace (a fine-grained token needs it granted "
                              "explicitly; https://huggingface.co/settings/tokens) and log in with it, or push to "
                              "your own namespace")
    if type(error).__name__ == "OfflineModeIsEnabled":
        return TurbotuneError(f"HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, so huggingface_hub makes no "
                              f"requests: {state}. Unset it and run the same command again")
    if isinstance(error, connection_errors()):
        return TurbotuneError(f"could not reach the Hugging Face Hub at {endpoint} ({type(error).__name__}: "
                              f"{_server_says(error)}): {state}. Check the network connection (and HTTPS_PROXY or "
                              "HF_ENDPOINT if set), then run the same command again (files already on the Hub are "
                              "skipped)")
    if status is not None:
        return TurbotuneError(f"the Hub at {endpoint} answered HTTP {status} ({_server_says(error)}): {state}")
    if isinstance(error, ValueError) and "Invalid metadata in README.md" in str(error):
        return TurbotuneError(f"the Hub refused the model card's metadata ({' '.join(str(error).split())}): "
                              f"{state}. Fix the YAML block at the top of README.md, or pass another card")
    return None


# ---------------------------------------------------------------- what the run left behind

def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _first_json(places, name: str) -> dict | None:
    for place in places:
        data = _read_json(place / name)
        if data is not None:
            return data
    return None


def _places(folder: Path, run_dir) -> list[Path]:
    """Folders that may hold the run's files, nearest first: the run folder given (or a checkpoint of it), then the
    exported folder and the folder around it (an adapter checkpoint's parent is its run folder)."""
    starts = ([Path(run_dir).expanduser().resolve()] if run_dir is not None else []) + [folder, folder.parent]
    places: list[Path] = []
    for start in starts:
        candidates = [start, start / LAST_CHECKPOINT]
        if (start / TRAINER_STATE).is_file():
            candidates.append(start.parent)  # a checkpoint: its run folder holds the log
        places += [p for p in candidates if p.is_dir() and p not in places]
    return places


def run_folder_of(adapter) -> Path | None:
    """`adapter` when it holds a run's files (a checkpoint of `turbotune train`, or its `export --how adapter`
    copy), for run_dir=; else None. The CLI passes its --adapter this way: a merged or GGUF export cannot say which
    run it came from."""
    adapter = Path(adapter).expanduser()
    found = any((adapter / name).is_file() for name in (LOG_FILE, RUN_CONFIG, TRAINER_STATE))
    return adapter if found else None


def read_run(folder, run_dir=None) -> dict:
    """The run's settings, log rows, log summary, adapter config and the export's merge report, each {} or []
    when not found. A `run_dir` that holds none of the run's files is an error."""
    folder = Path(folder).expanduser().resolve()
    if run_dir is not None:
        given = Path(run_dir).expanduser()
        if not any((p / name).is_file() for p in (given, given / LAST_CHECKPOINT)
                   for name in (LOG_FILE, RUN_CONFIG, TRAINER_STATE)):
            raise ConfigError(f"{given} holds no {LOG_FILE}, {RUN_CONFIG} or {TRAINER_STATE}: give the folder "
                              "`turbotune train` wrote (its --output-dir), or no run folder")
    places = _places(folder, run_dir)
    log = _first_json(places, LOG_FILE) or {}
    state = _first_json(places, TRAINER_STATE) or {}
    return {"config": _first_json(places, RUN_CONFIG) or state.get("config") or {},
            "history": [h for h in (log.get("history") or state.get("history") or []) if isinstance(h, dict)],
            "summary": log.get("summary") or {},
            "compute_dtype": state.get("compute_dtype"),
            "adapter_config": _first_json([folder, *places], "adapter_config.json") or {},
            "merge": _read_json(folder / MERGE_REPORT) or {}}


def _looks_like_hub_id(name: str) -> bool:
    return bool(REPO_ID_RE.fullmatch(name)) and ".." not in name and not os.path.isdir(name)


def base_model(folder, run: dict) -> tuple[str | None, str, str]:
    """(Hub id for the card's base_model or None, how the card names the base, a note on it or "")."""
    recorded = [run["adapter_config"].get("base_model_name_or_path")]
    if "model" in run["config"]:
        recorded.append(run["config"]["model"] or "default")  # None in a run's settings: the embedded default
    recorded.append((_read_json(Path(folder) / "config.json") or {}).get("_name_or_path"))
    names = [str(n) for n in recorded if n]
    for name in names:
        if is_default_alias(name) or Path(name).name.startswith(f"{DEFAULT_MODEL_NAME}-tf"):
            return DEFAULT_BASE_HUB_ID, DEFAULT_BASE_HUB_ID, (
                "It was trained on turbotune's embedded copy of that model, read from its Q4_1 GGUF and "
                "dequantised, whose weights differ slightly from the upstream checkpoint's.")
        if _looks_like_hub_id(name):
            return name, name, ""
    if names:
        return None, f"a local model folder named {Path(names[0]).name}", "That base model is not on the Hub."
    return None, "a base model that the run did not record", ""


# ---------------------------------------------------------------- the card

def model_card(folder, run_dir=None, repo_id=None) -> str:
    """README.md for an exported folder: YAML front matter for the Hub, then what the folder is, the data and the
    settings it was trained with, its final loss (when the run's files are found) and how to load it."""
    folder = Path(folder).expanduser().resolve()
    kind = folder_kind(folder)
    run = read_run(folder, run_dir)
    base_id, base_text, base_note = base_model(folder, run)
    qlora = bool(run["config"].get("load_in_4bit")) or run["merge"].get("trained_on") == "nf4"
    repo = check_repo_id(repo_id) if repo_id else None
    parts = [_front_matter(kind, base_id, qlora),
             _summary(folder, kind, base_text, base_note, qlora, repo),
             _data_section(run["config"]),
             _training_section(run),
             _export_section(run["merge"]),
             _usage_section(kind, base_id, repo or "USER/NAME", folder, qlora)]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _front_matter(kind: str, base_id: str | None, qlora: bool) -> str:
    tags = ["turbotune", "lora"] + (["qlora"] if qlora else []) + (["gguf"] if kind == "gguf" else [])
    lines = ["---"]
    if base_id:
        lines.append(f"base_model: {json.dumps(base_id)}")
    lines += [f"library_name: {LIBRARY[kind]}", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in tags] + ["---", ""]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _summary(folder: Path, kind: str, base_text: str, base_note: str, qlora: bool, repo: str | None) -> str:
    title = repo.split("/")[1] if repo else folder.name
    how = "QLoRA (LoRA on a 4-bit NF4 base)" if qlora else "LoRA"
    if kind == "adapter":
        what = (f"A {how} adapter for **{base_text}**, trained with turbotune. It holds only the adapter's "
                "weights: load it on top of that base model.")
    elif kind == "merged":
        what = (f"**{base_text}** with a {how} adapter (trained with turbotune) merged into its weights: an ordinary "
                "transformers checkpoint that loads without PEFT or turbotune.")
    else:
        what = (f"**{base_text}** with a {how} adapter (trained with turbotune) merged in, written as a GGUF file "
                "for llama.cpp and the tools built on it.")
    files = [f"- `{p.relative_to(folder).as_posix()}` ({_size(p.stat().st_size)})"
             for p in sorted(folder.rglob("*")) if p.is_file() and not stays_local(p.relative_to(folder))
             and p.name != "README.md"]
    return "\n".join([f"# {title}", "", what + (f" {base_note}" if base_note else ""), "", "## Files", "", *files, ""])


def _data_section(config: dict) -> str:
    if not config:
        return ""
    data = config.get("data")
    source = (f"`{Path(str(data)).name}` (a local file; only its name is given here)" if data
              else "turbotune's packaged sample of product-copywriting instructions")
    fmt = config.get("format")
    packing = {True: "on (several samples per row)", False: "off", None: "automatic"}.get(config.get("packing"), "?")
    lines = ["## Training data", "", f"- Data: {source}",
             f"- Format: {'detected from the rows' if fmt in (None, 'auto') else fmt}",
             f"- Samples cut to at most {config.get('max_seq_length')} tokens"]
    if "train_on_responses_only" in config:
        lines.append("- Loss on: " + ("the responses only (prompts masked)" if config["train_on_responses_only"]
                                      else "every token"))
    lines += [f"- Packing: {packing}", ""]
    return "\n".join(lines)


def _training_section(run: dict) -> str:
    config, history, summary = run["config"], run["history"], run["summary"]
    lines = ["## Training", ""]
    if config:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in _settings(config, run.get("compute_dtype"))]
        lines.append("")
    losses = [h for h in history if isinstance(h.get("loss"), (int, float))]
    if losses:
        first, last = losses[0], losses[-1]
        lines.append(f"- Final loss: **{last.get('loss'):.4f}** at step {last.get('step')}"
                     + (f" (epoch {last['epoch']:.2f})" if isinstance(last.get("epoch"), (int, float)) else "")
                     + f"; first logged loss {first.get('loss'):.4f} at step {first.get('step')}")
    if summary.get("skipped_nonfinite"):
        lines.append(f"- Steps skipped for a non-finite loss: {summary['skipped_nonfinite']}")
    if isinstance(summary.get("peak_memory_gib"), (int, float)):
        where = "GPU memory allocated" if summary.get("memory_kind") == "GPU Mem" else "process memory (RSS)"
        lines.append(f"- Peak {where}: {summary['peak_memory_gib']:.2f} GiB")
    if not config and not losses:
        lines.append("The run's settings and log were not found beside this folder, so they are not given here.")
    return "\n".join(lines) + "\n"


def _settings(config: dict, compute_dtype) -> list[tuple[str, object]]:
    r = config.get("lora_r")
    targets = config.get("target_modules")
    length = (f"{config['max_steps']} optimizer steps" if config.get("max_steps")
              else f"{config.get('epochs')} epochs")
    rows = [("LoRA rank r / alpha", f"{r} / {config.get('lora_alpha') or r}"),
            ("LoRA dropout", config.get("lora_dropout")),
            ("LoRA target modules", ", ".join(targets) if targets else "turbotune's default set"),
            ("base loaded in 4 bits (NF4)", "yes" if config.get("load_in_4bit") else "no"),
            ("learning rate", f"{config.get('lr')}, {config.get('lr_scheduler')} schedule, "
                              f"{config.get('warmup_steps')} warmup steps"),
            ("batch", f"{config.get('batch_size')} x {config.get('grad_accum')} gradient accumulation"),
            ("length", length),
            ("weight decay / max grad norm", f"{config.get('weight_decay')} / {config.get('max_grad_norm')}"),
            ("compute dtype", compute_dtype or config.get("dtype") or "automatic"),
            ("seed", config.get("seed"))]
    return [(name, value) for name, value in rows if value is not None]


def _export_section(merge: dict) -> str:
    if not merge:
        return ""
    into = {"nf4": "the 4-bit NF4 base, dequantised", "original": "the original 16-bit base weights"}
    lines = ["## Export", "", f"- Merged into: {into.get(merge.get('merged_into'), merge.get('merged_into'))}"
             + (", the weights the adapter was trained against" if merge.get("merged_into") == merge.get("trained_on")
                else "")]
    if merge.get("gguf_file"):
        lines.append(f"- GGUF: `{merge['gguf_file']}`, matrices in {merge.get('gguf_quant')}, norms in f32")
    elif merge.get("dtype"):
        lines.append(f"- Weights: {merge['dtype']}")
    if isinstance(merge.get("logits_max_abs_diff"), (int, float)):
        lines.append(f"- Check: logits of the merged weights against the unmerged adapter on "
                     f"{merge.get('probe_tokens')} probe tokens differ by at most {merge['logits_max_abs_diff']:.3g} "
                     f"({100 * float(merge.get('logits_relative_diff') or 0):.3f}% of the largest logit)")
    return "\n".join(lines + [""])


def _usage_section(kind: str, base_id: str | None, repo: str, folder: Path, qlora: bool) -> str:
    base = base_id or "BASE_MODEL"
    note = ([] if base_id else ["Replace BASE_MODEL with the model this adapter was trained on.", ""])
    if kind == "adapter":
        tokenizer_from = repo if (folder / "tokenizer_config.json").is_file() else base
        turbo_base = "default" if base_id == DEFAULT_BASE_HUB_ID else base
        return "\n".join([
            "## How to use", "", "With transformers and PEFT:", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_from}")', "```", "", *note,
            "With turbotune:", "", "```bash", f"hf download {repo} --local-dir adapter",
            f"turbotune chat --model {turbo_base} --adapter adapter" + (" --load-in-4bit" if qlora else ""),
            "```", ""])
    if kind == "merged":
        return "\n".join([
            "## How to use", "", "```python", "from transformers import pipeline", "",
            f'chat = pipeline("text-generation", model="{repo}")',
            'reply = chat([{"role": "user", "content": "Hello!"}], max_new_tokens=128)',
            'print(reply[0]["generated_text"][-1]["content"])', "```", "",
            "or `turbotune chat --model " + repo + "`.", ""])
    gguf = next((p.name for p in sorted(folder.glob("*.gguf"))), "model.gguf")
    ollama = [f"With Ollama: `ollama run hf.co/{repo}`"]
    if (folder / "Modelfile").is_file():  # `turbotune export --how ollama`: FROM ./<gguf>, so run it in the folder
        ollama.append(f", or with this repo's Modelfile (chat template, stop tokens): `hf download {repo} "
                      "--local-dir model && cd model && ollama create NAME -f Modelfile`")
    return "\n".join([
        "## How to use", "", "With llama.cpp:", "", "```bash", f"hf download {repo} {gguf} --local-dir .",
        f"llama-cli -m {gguf}", "```", "", "".join(ollama) + ".", ""])
