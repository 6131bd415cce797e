"""HTTP routes under /idlora/ (also served under /api/idlora/). See docs/API.md."""
from __future__ import annotations

import json
import logging

from aiohttp import web

from ..training.jobs import JobError, UnknownJob
from .job_service import manager

log = logging.getLogger(__name__)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _job_json(job) -> dict:
    return {**job.status.to_json(), "folder": str(job.dir)}


async def _body(request: web.Request) -> dict:
    """POST bodies are optional; when present they must be a JSON object."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the body is not valid JSON ({e}); send {{}} or "
                                                           f"nothing"}), content_type="application/json")
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": f"the body must be a JSON object, got "
                                                           f"{type(body).__name__}"}), content_type="application/json")
    return body


def _int_param(request: web.Request, name: str, default: int, minimum: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{name}={raw!r} is not a whole number"}),
                                 content_type="application/json") from None
    if value < minimum:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{name}={value} must be >= {minimum}"}),
                                 content_type="application/json")
    return value


def _guard(handler):
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except UnknownJob as e:
            return _error(404, str(e))
        except JobError as e:
            return _error(409, str(e))
    return run


@_guard
async def list_jobs(request):
    m = manager()
    return web.json_response({"jobs": [_job_json(j) for j in m.list()], "unreadable": m.unreadable})


@_guard
async def get_job(request):
    return web.json_response(_job_json(manager().get(request.match_info["id"])))


def _action(verb: str):
    """POST /idlora/jobs/{id}/<verb>: the manager's cancel / resume / restart; answers the job's status."""
    @_guard
    async def act(request):
        await _body(request)
        return web.json_response(_job_json(getattr(manager(), verb)(request.match_info["id"])))
    return act


@_guard
async def job_loss(request):
    job_id = request.match_info["id"]
    since = _int_param(request, "since_step", 0, 0)
    stride = _int_param(request, "stride", 1, 1)
    rows = manager().losses(job_id, since, stride)
    return web.json_response({"id": job_id, "since_step": since, "stride": stride, "losses": rows})


@_guard
async def job_samples(request):
    job_id = request.match_info["id"]
    files = manager().samples(job_id)
    return web.json_response({"id": job_id, "samples": [
        {"file": f, "step": int(f[5:-4]), "url": f"/idlora/jobs/{job_id}/samples/{f}"} for f in files]})


@_guard
async def job_sample_file(request):
    job_id, name = request.match_info["id"], request.match_info["file"]
    if name not in manager().samples(job_id):
        return _error(404, f"job {job_id} has no sample {name!r}; list them at /idlora/jobs/{job_id}/samples")
    return web.FileResponse(manager().get(job_id).dir / "samples" / name)


def register(routes: web.RouteTableDef) -> None:
    """ComfyUI serves these under /api/idlora/... as well."""
    routes.get("/idlora/jobs")(list_jobs)
    routes.get("/idlora/jobs/{id}")(get_job)
    for verb in ("cancel", "resume", "restart"):
        routes.post(f"/idlora/jobs/{{id}}/{verb}")(_action(verb))
    routes.get("/idlora/jobs/{id}/loss")(job_loss)
    routes.get("/idlora/jobs/{id}/samples")(job_samples)
    routes.get("/idlora/jobs/{id}/samples/{file}")(job_sample_file)


def register_with_server() -> None:
    from server import PromptServer
    if getattr(PromptServer, "instance", None) is None:  # imported outside a server (in-process tests)
        return
    register(PromptServer.instance.routes)
    manager()  # at start-up: jobs left queued or running by the last process show as interrupted
