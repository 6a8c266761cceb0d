"""The HTTP routes. Every /v1 route and /healthz needs the bearer token; the page shell (/ and
/static/*) and /openapi.json hold no data and are public, because a browser navigation cannot
send a bearer header (the page's script sends it on every data request)."""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import yaml
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qlora.service.artifacts import adapter_archive, adapter_record
from qlora.service.events import event_stream, job_view
from qlora.service.files import UploadRejected, list_files, read_text_file, receive_upload, upload_target
from qlora.service.runner import Runner
from qlora.service.security import token_matches
from qlora.service.store import STATES, Store
from qlora.service.submission import Rejected, job_folder, prepare_job, submitted_config
from qlora.service.summary import job_summary, read_metrics

STATIC = Path(__file__).parent / "static"
JOB_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@dataclass
class Settings:
    root: Path
    token: str
    slots: list[str]
    allow_remote_code: bool = False
    max_upload_bytes: int = 100 * 2**20
    max_config_bytes: int = 2**20
    stop_grace_s: float = 300.0


class JobSubmission(BaseModel):
    """POST /v1/jobs as JSON; a YAML body (Content-Type application/yaml) is the config alone."""

    model_config = ConfigDict(extra="forbid")
    config: Union[dict, str]
    """The job config: a mapping, or YAML text. Paths are relative to the service root; output.dir
    is set by the service."""
    priority: int = 0
    """Higher runs first; equal priorities run in submission order."""
    name: Optional[str] = None
    """A label shown in job lists."""
    gpus: int = Field(1, ge=1)
    """GPU slots the job runs on at once: N > 1 runs it under torchrun on N processes (DDP, or FSDP
    with train.distributed: fsdp); it waits until N slots are free."""


# POST /v1/jobs reads its body itself (JSON or YAML), so the schema documents both by hand.
SUBMIT_BODY = {
    "requestBody": {
        "content": {
            "application/json": {"schema": JobSubmission.model_json_schema()},
            "application/yaml": {
                "schema": {
                    "type": "string",
                    "description": "the job config; ?priority=, ?name= and ?gpus= as query parameters",
                }
            },
        },
        "required": True,
    }
}


def create_app(settings: Settings, echo=print) -> FastAPI:
    store = Store(settings.root / "service.db")
    runner = Runner(store, settings.root, settings.slots, stop_grace_s=settings.stop_grace_s, echo=echo)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        await run_in_threadpool(runner.stop)  # every running job checkpoints; they resume at the next start
        store.close()

    app = FastAPI(title="qlora training service", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    authorized = bearer_check(settings.token)
    add_page_routes(app)
    add_health_route(app, settings, store, runner, authorized)

    # One router carries the token check, so no /v1 route can be added without it.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
    add_submit_route(v1, settings, store, runner)
    add_job_routes(v1, settings, store, runner)
    add_adapter_routes(v1, settings, store)
    add_file_routes(v1, settings)
    app.include_router(v1)
    return app


def bearer_check(token: str):
    """The dependency every data route needs: the request's bearer token must be `token`."""
    bearer = HTTPBearer(auto_error=False, description="the service token (QLORA_SERVICE_TOKEN or ROOT/service_token)")

    def authorized(request: Request, _: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        # HTTPBearer only documents the scheme in the OpenAPI schema; the check is ours, in constant time.
        if not token_matches(request.headers.get("authorization"), token):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": 'Bearer realm="qlora"'}
            )

    return authorized


def known_job(store: Store, job_id: str):
    job = store.get(job_id) if JOB_ID.match(job_id) else None
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def add_page_routes(app: FastAPI) -> None:
    """The public page shell (/ and /static/*) and the headers every response carries."""

    @app.middleware("http")
    async def page_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def add_health_route(app: FastAPI, settings: Settings, store: Store, runner: Runner, authorized) -> None:
    @app.get("/healthz", dependencies=[Depends(authorized)])
    def healthz() -> dict:
        busy = len(settings.slots) - len(runner.free_slots())
        return {
            "ok": runner.thread.is_alive(),
            "slots": len(settings.slots),
            "busy": busy,
            "waiting": len(store.waiting()),
        }


def add_submit_route(v1: APIRouter, settings: Settings, store: Store, runner: Runner) -> None:
    @v1.post("/jobs", status_code=201, openapi_extra=SUBMIT_BODY)
    async def submit(
        request: Request, priority: int = Query(0), name: Optional[str] = Query(None), gpus: int = Query(1)
    ) -> dict:
        """Queue a job; 400 with the CLI's one-line error if its config, paths or data are wrong, or
        if it asks for more GPUs than the service has slots."""
        body = await read_capped(request, settings.max_config_bytes)
        submission = parse_submission(body, request.headers.get("content-type", ""), priority, name, gpus)
        if submission.gpus > len(settings.slots):  # it would wait forever: refuse it before any work
            raise HTTPException(
                400, f"gpus: {submission.gpus}: this service has {len(settings.slots)} GPU slot(s) (qlora serve --gpus)"
            )
        raw = submission.config
        if isinstance(raw, str):
            try:
                raw = yaml.safe_load(raw)
            except yaml.YAMLError as error:
                raise HTTPException(400, f"config: not valid YAML ({getattr(error, 'problem', error)})") from None
        try:
            prepared = await run_in_threadpool(
                prepare_job, settings.root, raw, settings.allow_remote_code, settings.slots[0]
            )
        except Rejected as error:
            raise HTTPException(400, str(error)) from None
        job = store.add(
            prepared.job_id, submission.name, submission.priority, prepared.total_steps, submission.gpus, prepared.notes
        )
        runner.wake.set()
        return {"id": job.id, "state": job.state, "notes": list(prepared.notes)}


def add_job_routes(v1: APIRouter, settings: Settings, store: Store, runner: Runner) -> None:
    """List, read, follow and cancel jobs."""

    @v1.get("/jobs")
    def list_jobs(state: Optional[str] = Query(None, description="only jobs in this state")) -> dict:
        if state is not None and state not in STATES:
            raise HTTPException(400, f"state: {state!r} is not one of {', '.join(STATES)}")
        jobs = store.list((state,) if state else STATES)
        return {"jobs": [job_view(job, job_folder(settings.root, job.id)) for job in jobs]}

    @v1.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict:
        return job_view(known_job(store, job_id), job_folder(settings.root, job_id))

    @v1.get(
        "/jobs/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "state, metrics, log and end events"}},
    )
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: `metrics` (a metrics.jsonl row), `log` (a line), `state`, and `end`
        when the job is finished; reconnect with Last-Event-ID to continue where it stopped."""
        known_job(store, job_id)
        stream = event_stream(
            lambda: store.get(job_id),
            job_folder(settings.root, job_id),
            request.headers.get("last-event-id"),
            request.is_disconnected,
        )
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @v1.get("/jobs/{job_id}/summary")
    def get_summary(job_id: str) -> dict:
        """The job's numbers: base, quantization, LoRA, learning rate, steps, duration, supervised
        tokens/s, MFU, peak memory, adapter size, eval loss before and after (None: not known yet)."""
        job = known_job(store, job_id)
        return job_summary(job, job_folder(settings.root, job_id), settings.root)

    @v1.get("/jobs/{job_id}/metrics")
    def get_metrics(job_id: str) -> dict:
        """Every metrics.jsonl row so far, one per step in step order (to draw or compare curves)."""
        known_job(store, job_id)
        return {"id": job_id, "rows": read_metrics(job_folder(settings.root, job_id) / "output" / "metrics.jsonl")}

    @v1.get("/jobs/{job_id}/config")
    def get_config(job_id: str) -> dict:
        """The config as submitted, paths relative to the root and without output.dir: ready to
        edit and submit again."""
        known_job(store, job_id)
        return {"id": job_id, "yaml": submitted_config(settings.root, job_id)}

    @v1.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict:
        """A waiting job is cancelled at once; a running one checkpoints its current step and stops."""
        known_job(store, job_id)
        return {"id": job_id, "state": runner.cancel(job_id)}


def add_adapter_routes(v1: APIRouter, settings: Settings, store: Store) -> None:
    """Download one succeeded job's adapter; list them all."""

    @v1.get(
        "/jobs/{job_id}/adapter",
        response_class=FileResponse,
        responses={200: {"content": {"application/gzip": {}}, "description": "the adapter folder as .tar.gz"}},
    )
    def download_adapter(job_id: str) -> FileResponse:
        job = known_job(store, job_id)
        if job.state != "succeeded":
            raise HTTPException(409, f"job {job_id} is {job.state}: an adapter exists once it succeeded")
        archive = adapter_archive(job_folder(settings.root, job_id), job_id)
        return FileResponse(archive, media_type="application/gzip", filename=f"{job_id}-adapter.tar.gz")

    @v1.get("/adapters")
    def list_adapters() -> dict:
        folders = [(job_folder(settings.root, job.id), job) for job in store.list(("succeeded",))]
        return {"adapters": [adapter_record(folder, job_view(job, folder)) for folder, job in folders]}


def add_file_routes(v1: APIRouter, settings: Settings) -> None:
    """Uploads under ROOT/files, which job configs name as files/<path>."""

    @v1.put(
        "/files/{path:path}",
        status_code=201,
        openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}, "required": True}},
    )
    async def upload(path: str, request: Request, overwrite: bool = Query(False)) -> dict:
        """Store the body as ROOT/files/<path>; name it as `files/<path>` in a job config."""
        declared = request.headers.get("content-length")
        try:
            if declared is not None and int(declared) > settings.max_upload_bytes:
                raise UploadRejected(
                    413, f"upload: {declared} bytes is over the limit of {settings.max_upload_bytes} bytes"
                )
            target = upload_target(settings.root, path, overwrite)
            received = await receive_upload(request.stream(), target, settings.max_upload_bytes)
        except UploadRejected as error:
            return JSONResponse({"detail": str(error)}, status_code=error.status, headers={"Connection": "close"})
        return {"path": str(target.relative_to(settings.root.resolve())), **received}

    @v1.get("/files")
    def uploaded_files() -> dict:
        return {"files": list_files(settings.root)}

    @v1.get("/files/{path:path}")
    def read_file(path: str) -> dict:
        """A text file under ROOT/files (a job config to start from), up to the config size limit."""
        try:
            text = read_text_file(settings.root, path, settings.max_config_bytes)
        except UploadRejected as error:
            raise HTTPException(error.status, str(error)) from None
        return {"path": f"files/{path}", "text": text}


async def read_capped(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"config: over the limit of {limit} bytes")
    return bytes(body)


def parse_submission(body: bytes, content_type: str, priority: int, name: Optional[str], gpus: int) -> JobSubmission:
    try:
        if content_type.split(";")[0].strip().lower() in YAML_TYPES:
            return JobSubmission(config=body.decode("utf-8", "replace"), priority=priority, name=name, gpus=gpus)
        return JobSubmission.model_validate_json(body)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "body"
        raise HTTPException(
            400,
            f'{where}: {problem["msg"]} (send JSON {{"config": ..., "priority": 0}} '
            "or a YAML body with Content-Type application/yaml)",
        ) from None
