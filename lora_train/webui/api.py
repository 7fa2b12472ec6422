"""REST routes under /lora-train/v1: start a job, poll it, stop it, check a dataset (the doctor) and fix it, list
presets, describe the config keys.

Host-agnostic (FastAPI only) so tests drive it with TestClient. The WebUI glue mounts it only under ``--api``
and passes the ``--api-auth`` credentials; routes an extension adds get no auth from the WebUI by themselves.
Bad input answers 4xx with ``{"detail": {"field": ..., "message": ...}}`` naming the config field.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from lora_train.engine.config.settings import ConfigError, field_infos
from lora_train.webui import doctor
from lora_train.webui.grid_jobs import choose
from lora_train.webui.jobs import BusyError, HostError, JobRunner
from lora_train.webui.paths import INPUT_KEYS, PathNotAllowed
from lora_train.webui.presets import DEFAULT_PRESET, PRESET_NAMES, all_presets

PREFIX = "/lora-train/v1"
INSECURE_FLAG = "--enable-insecure-extension-access"


def parse_credentials(api_auth: str | None) -> dict[str, str]:
    """``user:pass,user2:pass2`` (the WebUI's --api-auth) as a dict; a password may contain ':'."""
    credentials = {}
    for item in (api_auth or "").split(","):
        if ":" in item:
            user, password = item.split(":", 1)
            credentials[user.strip()] = password
    return credentials


def _basic_auth(credentials: dict[str, str]) -> Callable[..., None]:
    security = HTTPBasic()

    def check(given: HTTPBasicCredentials = Depends(security)) -> None:  # noqa: B008 - FastAPI's idiom
        expected = credentials.get(given.username)
        # compare even for an unknown user so timing does not reveal which user names exist
        ok = secrets.compare_digest(given.password.encode(), (expected or "\0" + given.password).encode())
        if not (expected is not None and ok):
            raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return check


# the WebUI's own rule (modules/shared_cmd_options.py): any of these makes it "non-local"
NON_LOCAL_FLAGS = (("share", "--share"), ("listen", "--listen"), ("ngrok", "--ngrok"), ("server_name", "--server-name"))


def path_refusal(cmd_opts: Any) -> str | None:
    """Why requests naming server paths are refused under these WebUI flags, or None when they are allowed.

    The WebUI sets ``disable_extension_access`` when any of --share/--listen/--ngrok/--server-name is given
    (even ``--server-name 127.0.0.1``) without --enable-insecure-extension-access; the message names the flag
    that did it and both ways out. Requests that passed --api-auth are the owner's and are never refused.
    """
    if not getattr(cmd_opts, "disable_extension_access", False):
        return None
    given = [flag for attr, flag in NON_LOCAL_FLAGS if getattr(cmd_opts, attr, None)]
    cause = f"the WebUI was started with {' and '.join(given)}" if given else "the WebUI listens beyond localhost"
    return (f"training from server paths over the API is disabled because {cause}, which the WebUI treats as "
            f"reachable from the network; add {INSECURE_FLAG} to allow it, or --api-auth user:password so that "
            "only authenticated requests are served")


def _error(status: int, field: str | None, message: str) -> HTTPException:
    return HTTPException(status, {"field": field, "message": message})


def build_router(
    runner: JobRunner,
    credentials: dict[str, str] | None = None,
    path_refusal: str | None = None,
) -> APIRouter:
    """Routes over ``runner``. ``credentials`` turns on HTTP basic auth; ``path_refusal`` (see ``path_refusal()``)
    refuses requests naming server paths with that message, unless credentials authenticate every request."""
    dependencies = [Depends(_basic_auth(credentials))] if credentials else []
    router = APIRouter(prefix=PREFIX, dependencies=dependencies)
    refusal = None if credentials else path_refusal

    def job_body(payload: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """A job's config values (a ``preset``'s under the given ones) and the preset's name; 403/422 as a job."""
        data = dict(payload)
        if refusal:
            named = [key for key in INPUT_KEYS if data.get(key)]
            raise _error(403, named[0] if named else "train_data_dir", refusal)
        preset = data.pop("preset", None)
        if preset:
            try:
                data = {**runner.host.preset(str(preset)), **data}
            except ValueError as exc:
                raise _error(422, "preset", str(exc)) from None
        return data, str(preset) if preset else None

    @router.post("/jobs")
    def create_job(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        data, _ = job_body(payload)
        try:
            job = runner.submit(data)
        except PathNotAllowed as exc:
            raise _error(403, exc.key, str(exc)) from None
        except ConfigError as exc:
            raise _error(422, exc.key, str(exc)) from None
        except BusyError as exc:
            raise _error(409, None, str(exc)) from None
        except HostError as exc:
            raise _error(409, "model", str(exc)) from None
        return {"id": job.id, "state": job.state, "name": job.cfg.output_name}

    @router.post("/doctor")
    def check_dataset(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        """The dataset doctor's report for a job body: findings (severity, code, files, what to do, fix)."""
        data, preset = job_body(payload)
        try:
            _, report = doctor.check(runner, data, preset)
        except PathNotAllowed as exc:
            raise _error(403, exc.key, str(exc)) from None
        except ConfigError as exc:
            raise _error(422, exc.key, str(exc)) from None
        return report.to_dict()

    @router.post("/doctor/fix")
    def fix_dataset(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        """Apply one fix (``"fix": "exclude" | "trigger" | "tags"``) to what the doctor finds in a job body's
        dataset (the trigger fix writes the body's trigger_word, else the one the doctor inferred); files are
        moved aside, never deleted. Refused while a job trains."""
        body = dict(payload)
        name = str(body.pop("fix", ""))
        data, preset = job_body(body)
        current = runner.current
        if current is not None and current.active:
            raise _error(409, None, "a LoRA is training; fix its dataset after it finishes")
        try:
            result, report = doctor.fix(runner, data, name, preset)
        except PathNotAllowed as exc:
            raise _error(403, exc.key, str(exc)) from None
        except ConfigError as exc:
            raise _error(422, exc.key, str(exc)) from None
        return {"summary": result.summary(), "moved": [list(pair) for pair in result.moved],
                "rewritten": result.rewritten, "report": report.to_dict()}

    @router.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        job = runner.get(job_id)
        if job is None:
            raise _error(404, "id", f"no job {job_id!r}")
        return job.to_dict()

    @router.post("/jobs/{job_id}/stop")
    def stop_job(job_id: str) -> dict[str, Any]:
        if not runner.stop(job_id):
            raise _error(404, "id", f"no job {job_id!r}")
        return runner.get(job_id).to_dict()  # type: ignore[union-attr]

    @router.post("/grids")
    def create_grid(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        """An epoch x strength grid of a LoRA with saved steps: ``lora`` (file name in the Lora folder or a path
        the path policy allows) and optionally prompts, strengths, negative, seed, steps, cfg_scale, width, height.
        The same request after a stop continues where it stopped."""
        named = str(payload.get("lora", ""))
        if refusal and ("/" in named or "\\" in named):  # a bare name in the Lora folder names no server path
            raise _error(403, "lora", refusal)
        try:
            job = runner.grids.submit(dict(payload))
        except PathNotAllowed as exc:
            raise _error(403, exc.key, str(exc)) from None
        except ConfigError as exc:
            raise _error(422, exc.key, str(exc)) from None
        except ValueError as exc:  # GridError: nothing to compare
            raise _error(422, "lora", str(exc)) from None
        except BusyError as exc:
            raise _error(409, None, str(exc)) from None
        return job.to_dict()

    def _grid(grid_id: str):
        job = runner.grids.get(grid_id)
        if job is None:
            raise _error(404, "id", f"no grid {grid_id!r}")
        return job

    @router.get("/grids/{grid_id}")
    def get_grid(grid_id: str) -> dict[str, Any]:
        return _grid(grid_id).to_dict()

    @router.post("/grids/{grid_id}/stop")
    def stop_grid(grid_id: str) -> dict[str, Any]:
        job = _grid(grid_id)
        runner.grids.stop(grid_id)
        return job.to_dict()

    @router.post("/grids/{grid_id}/choose")
    def choose_cell(grid_id: str, payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """``{"row": i, "column": j, "keep_step": false}``: column 0 is the plain image, 1.. the strengths. Sets the
        card's preferred weight; ``keep_step`` also copies that row's file over the final one (nothing deleted)."""
        job = _grid(grid_id)
        if job.active:
            raise _error(409, None, "the grid is still being made")
        try:
            choice = choose(job, int(payload.get("row", -1)), int(payload.get("column", -1)),
                            bool(payload.get("keep_step", False)), runner.policy.run_root)
        except (TypeError, ValueError) as exc:
            raise _error(422, "column", str(exc)) from None
        if choice.kept is not None:
            runner.host.finished(job)  # the WebUI rescans models/Lora: the file under that name changed
        return {"lora": str(choice.lora), "preferred_weight": choice.weight, "card": str(choice.card),
                "row": choice.row.label, "kept": str(choice.kept) if choice.kept else None,
                "backup": str(choice.backup) if choice.backup else None, "message": choice.message()}

    @router.get("/presets")
    def presets() -> dict[str, Any]:
        family = runner.host.family()
        return {"family": family, "default": DEFAULT_PRESET, "names": list(PRESET_NAMES),
                "presets": all_presets(family, runner.host.device_type())}

    @router.get("/schema")
    def schema() -> dict[str, Any]:
        """Every config key a job accepts: type, default, help, group, label, scope, choices and aliases."""
        return {"fields": [info.to_dict() for info in field_infos()]}

    return router
