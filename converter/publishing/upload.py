"""The upload: huggingface_hub's create_repo(exist_ok=True), create_branch (for --revision) and
create_commit of the model's files (through hf_xet when installed, which resumes an interrupted upload; else the LFS
protocol).  The token comes from HF_TOKEN or the stored login and is handed to HfApi only: it is
never printed, and every message that leaves this module has it masked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConversionError
from ..write.workfiles import model_files

MASK = "***"
NETWORK_ERRORS = {"TransportError", "ConnectError", "NetworkError", "TimeoutException", "ConnectTimeout",
                  "ReadTimeout", "RemoteProtocolError", "ProxyError", "ConnectionError"}


@dataclass
class Target:
    repo_id: str
    revision: str | None  # a branch; None: main
    private: bool
    commit_message: str

    @property
    def branch(self) -> str:
        return self.revision or "main"


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def find_token() -> str:
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception as e:  # noqa: BLE001 - e.g. an OIDC exchange that failed
        raise ConversionError(f"cannot get a Hugging Face token ({type(e).__name__}); nothing was uploaded") from None
    if not token:
        raise ConversionError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`; nothing was uploaded")
    return token


def mask(text: str, token: str | None) -> str:
    return text.replace(token, MASK) if token else text


def _chain(e: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and all(e is not x for x in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def explain(e: BaseException, target: Target, token: str | None, step: str = "upload") -> str:
    """One line for a failed upload, naming the repo and the step; the token masked."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    repo = f"{target.repo_id}: {step}"
    chain = _chain(e)
    http = next((x for x in chain if isinstance(x, HfHubHTTPError) and x.response is not None), None)
    network = next((x for x in chain if not isinstance(x, HfHubHTTPError) and (
        isinstance(x, OSError) or any(c.__name__ in NETWORK_ERRORS for c in type(x).__mro__))), None)
    if any(isinstance(x, OfflineModeIsEnabled) for x in chain):
        line = f"{repo}: HF_HUB_OFFLINE is set; unset it to publish (or use --dry-run)"
    elif http is not None:
        status = http.response.status_code
        why = {401: "the Hub refused the token (401 Unauthorized): check HF_TOKEN or `hf auth login`",
               403: "no write access (403 Forbidden): the token needs write permission on this namespace",
               404: "not found (404): wrong repo id or no access"}.get(status)
        first = (str(http).splitlines() or [""])[0]
        line = f"{repo}: {why or f'the Hub answered {status}: {first}'}"
    elif network is not None:
        line = (f"{repo}: cannot reach the Hub at {hub_endpoint()} (no network?): {type(network).__name__}; "
                f"nothing was committed")
    else:
        first = (str(e).splitlines() or [""])[0]
        if e.__cause__ is not None:
            first += f" ({type(e.__cause__).__name__}: {(str(e.__cause__).splitlines() or [''])[0]})"
        line = f"{repo}: {type(e).__name__}: {first}"
    return mask(line, token) + "; re-run publish to resume"


def upload(out: Path, target: Target, token: str) -> dict:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    step = "creating the repository"
    try:
        url = api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if target.revision:
            step = f"creating branch {target.revision}"
            api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
        step = "uploading"
        # exactly the model's files, listed one by one (never a folder walk that could pick up a
        # work folder, a backup or a symlink out of OUT)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in model_files(out)]
        info = api.create_commit(repo_id=target.repo_id, operations=operations, revision=target.revision,
                                 commit_message=target.commit_message)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one line with the token masked
        raise ConversionError(explain(e, target, token, step)) from None
    return {"repo_url": mask(str(url), token), "commit_url": mask(str(info.commit_url), token),
            "commit": info.oid}
