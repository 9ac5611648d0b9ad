"""Pushing a finished checkpoint to the Hugging Face Hub in one commit, retried and resumed on a broken connection.

Only a finished output is pushed: a folder with its record, config and complete safetensors weights, and no
trace of an unfinished run (stream.PartialOutput's progress file, a `.NAME.partial` directory, half-written
`.tmp` / `.partial-` files). Everything goes in one commit, so the repo shows the old state or the whole
checkpoint, never a part of it.

Retries: each attempt is a fresh `create_commit` of every file. huggingface_hub asks the Hub first what it
holds (`preupload`: the remote id of each path; the LFS batch API: which objects it has already), so an
attempt after a broken connection sends only what did not arrive: LFS objects stored by an earlier attempt
(or an earlier run) come back without upload actions and are skipped, and if the commit itself went through
but its answer was lost, every file matches its remote id and no second commit is made. The sha256 of each
file is computed once and kept across attempts. With hf_xet installed (huggingface_hub's default) the
content goes through Xet instead, whose storage deduplicates what an earlier attempt sent.
"""

from __future__ import annotations

import glob
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from safetensors import safe_open

from llm_sparsify.checkpoint import weight_map
from llm_sparsify.errors import UserError
from llm_sparsify.export.card import CARD, write_model_card
from llm_sparsify.export.hf import require_record
from llm_sparsify.files import PROGRESS

log = logging.getLogger(__name__)

BACKOFF_SECONDS = 1.0  # wait before the first retry; doubled before each next one
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_NETWORK_ERRORS = {"ConnectionError", "TimeoutError", "TransportError", "Timeout"}  # builtins, httpx(2), requests
_XET_STATUS = re.compile(r"(?:client|server) error \((\d{3})")


class PushError(UserError, ValueError):
    """A folder that is not a finished checkpoint, a token the Hub refuses, or an upload that kept failing."""


def finished_files(folder: Path) -> list[Path]:
    """Every file of a finished llm_sparsify output (hidden ones aside), or a PushError that says why it is not."""
    if not folder.is_dir():
        raise PushError(f"{folder} is not a directory")
    if (folder.name.startswith(".") and ".partial" in folder.name) or (folder / PROGRESS).exists():
        raise PushError(f"{folder} is the partial output of an unfinished run; run its command again to finish it")
    writers = sorted(p.name for p in folder.parent.glob(f".{glob.escape(folder.name)}.partial*"))
    if writers:
        raise PushError(f"an unfinished run is writing {folder.parent / writers[0]}, which replaces {folder} when "
                        "done; finish that run (its command again) or remove that directory before pushing")
    half_written = sorted(p.name for p in [*folder.glob("*.tmp"), *folder.glob(".*.partial-*")])
    if half_written:
        raise PushError(f"{folder} holds half-written files ({', '.join(half_written)}): is something writing it?")
    require_record(folder, PushError)
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} has no config.json")
    try:
        for shard in sorted(set(weight_map(folder).values())):
            with safe_open(folder / shard, "pt"):  # the header must cover the whole file: not truncated
                pass
    except Exception as error:  # no weights, a missing shard, a truncated or foreign file
        raise PushError(f"{folder} has no complete safetensors weights: {error}") from error
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _chain(error: BaseException) -> list[BaseException]:
    """The error and the errors it was raised from."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def http_status(error: BaseException) -> int | None:
    """The HTTP status behind a failure, if the Hub answered: from huggingface_hub's error, or from the message
    of hf_xet's ConnectionError ("... client error (404 Not Found) ...")."""
    for seen in _chain(error):
        if isinstance(seen, HfHubHTTPError) and seen.response is not None:
            return seen.response.status_code
        if isinstance(seen, ConnectionError) and (match := _XET_STATUS.search(str(seen))):
            return int(match.group(1))
    return None


def is_transient(error: BaseException) -> bool:
    """A broken connection, a timeout or a server-side failure (5xx, 429): worth another attempt."""
    status = http_status(error)
    if status is not None:
        return status in _RETRY_STATUS
    return any(kind.__name__ in _NETWORK_ERRORS for seen in _chain(error) for kind in type(seen).__mro__)


def _explain(error: Exception, repo_id: str, attempts: int) -> str:
    """One line on why the push failed, and what to do."""
    status = http_status(error)
    if status == 401:
        return ("the Hub refused the token (401 Unauthorized): pass a valid token with write access, set HF_TOKEN, "
                "or log in with `hf auth login`")
    if status == 403:
        return f"the token may not write to {repo_id} (403 Forbidden): {error}"
    if status == 404 and "/xet-" in str(error):
        return ("the Hub endpoint offers no Xet storage (404 on its Xet token route); set HF_HUB_DISABLE_XET=1 to "
                "upload over plain LFS")
    if is_transient(error):
        return (f"push to {repo_id} failed after {attempts} attempts ({error}); run it again to resume: what the Hub "
                "already holds is not sent again")
    return f"push to {repo_id} failed: {error}"


def with_retries(attempt: Callable[[], str], retries: int, repo_id: str) -> str:
    """Run `attempt` until it succeeds, retrying transient failures `retries` times with exponential backoff."""
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except PushError:
            raise
        except Exception as error:
            if attempts > retries or not is_transient(error):
                raise PushError(_explain(error, repo_id, attempts)) from error
            wait = BACKOFF_SECONDS * 2 ** (attempts - 1)
            log.warning("push to %s: %s; retrying in %.0f s (%d of %d)", repo_id,
                        (str(error) or type(error).__name__).splitlines()[0], wait, attempts, retries)
            time.sleep(wait)


def _token(token: str | None) -> str:
    """`token`, else HF_TOKEN, else the cached login; a PushError when there is none."""
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: pass one, set HF_TOKEN, or log in with `hf auth login`")
    return token


def check_token(token: str | None = None, repo_id: str = "the Hub", retries: int = 3) -> str:
    """The user name of a token the Hub accepts for writing (`token`, else HF_TOKEN, else the cached login), asked
    before hours of work; a PushError when there is none, the Hub refuses it, or it may only read."""
    token = _token(token)
    answer = with_retries(lambda: HfApi(token=token).whoami(token=token), retries, repo_id)
    role = ((answer.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError(f"the token of {answer.get('name')} may only read; pushing to {repo_id} needs a token with "
                        "write access")
    return answer.get("name", "")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    retries: int = 3,
) -> str:
    """Upload a finished checkpoint folder to `repo_id` (created if needed) in one commit; return its URL.

    The token is `token`, else HF_TOKEN, else the cached login. `revision` is a branch, created from main
    if missing. The model card is written first if the folder has none.
    """
    folder = Path(folder)
    if retries < 0:
        raise PushError(f"retries must be 0 or more, not {retries}")
    finished_files(folder)
    token = _token(token)
    if not (folder / CARD).exists():
        write_model_card(folder)
    files = finished_files(folder)  # now with the card and its plot
    message = commit_message or f"Upload {folder.name} (llm_sparsify)"
    api = HfApi(token=token)
    hashed: dict[str, CommitOperationAdd] = {}

    def addition(path: Path) -> CommitOperationAdd:
        """A fresh operation per attempt (its remote state is asked again), keeping the sha256 once computed."""
        name = path.relative_to(folder).as_posix()
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
        operation.upload_info = hashed.setdefault(name, operation).upload_info
        return operation

    def attempt() -> str:
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if private and not api.repo_info(repo).private:
            raise PushError(f"{repo} exists and is public; make it private first, or push without private")
        if revision and not revision.startswith("refs/"):
            api.create_branch(repo, branch=revision, exist_ok=True)
        operations = [addition(path) for path in files]
        return api.create_commit(repo, operations, commit_message=message, revision=revision).commit_url

    url = with_retries(attempt, retries, repo_id)
    log.info("pushed %s to %s", folder, url)
    return url
