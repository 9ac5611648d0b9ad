"""push_to_hub over real HTTP against the local Hub of tests/hub_server.py: round trip, retries, refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from llm_sparsify import compress
from llm_sparsify.export.hf import RECORD, save_checkpoint
from llm_sparsify.export.hub import PushError, push_to_hub
from llm_sparsify.stream import PROGRESS
from tests.conftest import tiny_model
from tests.hub_server import GITATTRIBUTES, HubServer

TOKEN, USER = "hf_local_test_token", "alice"
REPO = f"{USER}/tiny-magnitude-50"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished llm_sparsify checkpoint of a tiny Llama: magnitude-pruned weights, tokenizer, config, record."""
    model = compress(tiny_model(), "magnitude-50", device="cpu")
    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(20)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        unk_token="<unk>")
    shares = {name: (m.weight == 0).float().mean().item() for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in name}
    record = {
        "llm_sparsify_version": "0.1.0", "base_model": "tiny-llama", "recipe_name": "magnitude-50",
        "recipe": {"pruning": {"method": "magnitude", "sparsity": 0.5, "targets": ["*"], "ignore": []}},
        "calibration": {}, "device": "cpu", "dtype": "float32", "seconds": 0.1,
        "sparsity": {"overall": sum(shares.values()) / len(shares),
                     "by_type": {name.rsplit(".", 1)[-1]: share for name, share in shares.items()}, "modules": shares},
        "layers": [{"index": i, "seconds": 0.01,
                    "sparsity": {n: s for n, s in shares.items() if f".layers.{i}." in n}} for i in range(3)],
    }
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("finished") / "tiny-magnitude-50", record)


@pytest.fixture
def checkpoint(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "out" / finished.name))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The local Hub as huggingface_hub's endpoint, with HF_TOKEN set, Xet off and no cached login: in the
    environment (for child processes) and in the copies huggingface_hub made of it at import (for this one)."""
    with HubServer(tmp_path / "hub", {TOKEN: USER}) as server:
        home = tmp_path / "hf-home"
        for name, value in {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
                            "HF_HOME": str(home)}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        yield server


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def download_all(hub: HubServer, repo: str, revision: str, cache: Path) -> dict[str, bytes]:
    """Every file of the repo at `revision`, fetched with hf_hub_download (HEAD + GET on resolve/)."""
    return {name: Path(hf_hub_download(repo, name, revision=revision, token=TOKEN, cache_dir=cache)).read_bytes()
            for name in hub.files(repo, revision)}


def lfs_objects(hub: HubServer, repo: str) -> set[str]:
    return {entry["sha256"] for entry in hub.repos[repo]["commits"][hub.head(repo)]["files"].values() if entry["lfs"]}


def test_round_trip_from_a_fresh_process_private_on_a_branch(hub, checkpoint, tmp_path):
    """A child process that only has the environment (HF_ENDPOINT, HF_TOKEN, ...) pushes; every file comes back."""
    script = ("import sys; from llm_sparsify.export.hub import push_to_hub; "
              "print(push_to_hub(sys.argv[1], sys.argv[2], private=True, revision='pruned-v1'))")
    child = subprocess.run([sys.executable, "-c", script, str(checkpoint), REPO], cwd=ROOT, env=os.environ.copy(),
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]

    assert hub.repos[REPO]["private"] is True
    head = hub.head(REPO, "pruned-v1")
    assert child.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO}/commit/{head}"
    assert hub.history(REPO, "pruned-v1") == ["Upload tiny-magnitude-50 (llm_sparsify)", "initial commit"]
    assert hub.history(REPO, "main") == ["initial commit"]  # the branch took the commit, main did not
    stored = hub.repos[REPO]["commits"][head]["files"]
    assert stored["model.safetensors"]["lfs"] and not stored["config.json"]["lfs"]  # both upload paths taken

    local = local_files(checkpoint)
    assert {"README.md", "llm_sparsify_layers.png", RECORD, "tokenizer.json"} <= set(local)  # card written first
    assert download_all(hub, REPO, "pruned-v1", tmp_path / "cache") == local | {".gitattributes": GITATTRIBUTES}
    with pytest.raises(HfHubHTTPError) as refused:  # private: not for anyone without the token
        hf_hub_download(REPO, "config.json", revision="pruned-v1", token=False, cache_dir=tmp_path / "cache2")
    assert refused.value.response.status_code == 401


def test_dropped_connections_are_retried_and_nothing_is_sent_twice(hub, checkpoint, tmp_path):
    """An LFS upload cut mid-body and a commit cut before the server acts: the push still completes, the second
    attempt's LFS batch finds every object stored, so none is uploaded again."""
    hub.drop("lfs-upload", 1, "before")
    hub.drop("commit", 1, "before")
    url = push_to_hub(checkpoint, REPO, retries=2)

    assert url == f"{hub.url}/{REPO}/commit/{hub.head(REPO)}"
    assert hub.history(REPO) == ["Upload tiny-magnitude-50 (llm_sparsify)", "initial commit"]
    assert download_all(hub, REPO, "main", tmp_path / "cache") == local_files(checkpoint) | {
        ".gitattributes": GITATTRIBUTES}
    objects = lfs_objects(hub, REPO)
    assert hub.counts["commit"] == 2 and hub.counts["lfs-batch"] == 2
    assert hub.counts["lfs-upload"] == len(objects) + 1  # one PUT cut and sent again, then none in attempt 2
    assert all(hub.stored[oid] == 1 for oid in objects)


def test_a_commit_whose_answer_is_lost_is_not_made_twice(hub, checkpoint):
    hub.drop("commit", 1, "after")  # the server commits, the client hears nothing
    url = push_to_hub(checkpoint, REPO)

    assert hub.history(REPO) == ["Upload tiny-magnitude-50 (llm_sparsify)", "initial commit"]
    assert url.endswith(hub.head(REPO))
    assert hub.counts["commit"] == 1  # the retry saw every file already there and committed nothing
    assert all(hub.stored[oid] == 1 for oid in lfs_objects(hub, REPO))


def test_gives_up_after_its_retries_and_leaves_the_repo_as_it_was(hub, checkpoint):
    for nth in (1, 2):
        hub.drop("commit", nth, "before")
    with pytest.raises(PushError, match="failed after 2 attempts.*run it again to resume"):
        push_to_hub(checkpoint, REPO, retries=1)
    assert hub.history(REPO) == ["initial commit"]


def _progress(folder: Path) -> Path:
    (folder / PROGRESS).write_text("{}")
    return folder


def _partial_itself(folder: Path) -> Path:
    return folder.rename(folder.with_name(f".{folder.name}.partial"))


def _writer_beside(folder: Path) -> Path:
    folder.with_name(f".{folder.name}.partial").mkdir()
    return folder


def _without(name: str):
    def remove(folder: Path) -> Path:
        (folder / name).unlink()
        return folder
    return remove


def _truncated(folder: Path) -> Path:
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    return folder


def _tmp_file(folder: Path) -> Path:
    (folder / "model-00002-of-00002.safetensors.tmp").write_bytes(b"\0" * 10)
    return folder


@pytest.mark.parametrize(("spoil", "message"), [
    (_progress, "partial output of an unfinished run"),
    (_partial_itself, "partial output of an unfinished run"),
    (_writer_beside, "an unfinished run is writing"),
    (_without("model.safetensors"), "no complete safetensors weights"),
    (_truncated, "no complete safetensors weights.*not fully covered"),
    (_without(RECORD), f"no {RECORD}"),
    (_without("config.json"), "no config.json"),
    (_tmp_file, "half-written files"),
], ids=["progress-file", "partial-directory", "run-writing-beside", "no-weights", "truncated-weights", "no-record",
        "no-config", "tmp-file"])
def test_refuses_an_unfinished_output_before_any_request(hub, checkpoint, spoil, message):
    folder = spoil(checkpoint)
    with pytest.raises(PushError, match=message):
        push_to_hub(folder, REPO)
    assert hub.requests == []
    assert not (folder / "README.md").exists()


def test_a_token_the_hub_refuses_is_a_clear_error(hub, checkpoint):
    with pytest.raises(PushError, match=r"refused the token \(401"):
        push_to_hub(checkpoint, REPO, token="hf_not_a_token")
    assert hub.repos == {}
    assert {kind for kind, _, _ in hub.requests} <= {"create", "info", "unknown"}  # nothing uploaded


def test_no_token_anywhere_is_a_clear_error(hub, checkpoint, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PushError, match="no Hugging Face token"):
        push_to_hub(checkpoint, REPO)
    assert hub.requests == []


def test_private_push_to_an_existing_public_repo_is_refused(hub, checkpoint):
    push_to_hub(checkpoint, REPO)
    with pytest.raises(PushError, match="exists and is public"):
        push_to_hub(checkpoint, REPO, private=True, revision="v2")
    assert "v2" not in hub.repos[REPO]["branches"]


def test_push_command_uploads_and_refuses_unfinished_folders(hub, checkpoint, capsys):
    from llm_sparsify.cli import main

    assert main(["push", str(checkpoint), REPO, "--revision", "v1", "-q"]) == 0
    head = hub.head(REPO, "v1")
    assert f"/{REPO}/commit/{head}" in capsys.readouterr().out
    assert set(hub.repos[REPO]["commits"][head]["files"]) >= set(local_files(checkpoint))

    (checkpoint / PROGRESS).write_text("{}")  # what an unfinished run leaves
    requests = len(hub.requests)
    assert main(["push", str(checkpoint), REPO, "-q"]) == 2
    assert "llm-sparsify: error:" in capsys.readouterr().err
    assert len(hub.requests) == requests
