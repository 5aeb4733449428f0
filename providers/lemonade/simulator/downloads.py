"""Pulls (SSE progress) and server-owned download jobs (v10.6+, §2.8-2.9)."""

from __future__ import annotations

import asyncio
from typing import Any

from providers.lemonade import catalog
from providers.lemonade.simulator.constants import (
    JOB_ACTIONS,
    JOB_LINGER_SECONDS,
    RECIPE_OPTION_KEYS,
    STEP_FIELDS,
)
from providers.lemonade.simulator.registry import is_reserved_registration_name
from providers.lemonade.simulator.wire import (
    ApiError,
    Request,
    Response,
    json_response,
    parse_required_json,
    sse,
)


class DownloadsMixin:
    def pull_files(self, cid: str) -> list[tuple[str, int]]:
        entry = self.catalog[cid]
        total = max(int(self.size_gb(cid) * 1024 ** 3), 1024 * 1024)
        ckpts = entry.get("checkpoints") or {"main": catalog.checkpoint(entry)}
        names = []
        for ckpt in ckpts.values():
            repo, _, variant = ckpt.partition(":")
            base = repo.rsplit("/", 1)[-1].removesuffix("-GGUF")
            if variant and "." in variant:
                names.append(variant.rsplit("/", 1)[-1])
            elif variant:
                names.append(f"{base}-{variant}.gguf")
            else:
                names.append(f"{base}.safetensors")
        names.append(entry["mmproj"] if entry.get("mmproj") else "config.json")
        # the main file carries (nearly) all the bytes, like a real GGUF download
        sizes = [int(total * 0.97)] + [max(1, int(total * 0.03 / (len(names) - 1)))] * (
            len(names) - 1)
        return list(zip(names, sizes, strict=True))

    def pull_target(self, name: str, body: dict) -> str:
        """ModelManager::download_model's checks (and the registration of a new `user.*`
        model): the catalogue key to download, or the ApiError lemond answers (400 with
        `code: unknown_model` for an unknown name, 500 for the other refusals)."""
        checkpoints = body.get("checkpoints")
        if "checkpoints" in body and not (isinstance(checkpoints, dict) and "main" in checkpoints):
            raise ApiError(500, {"error": "If present, the `checkpoints` property must be an "
                                          "object and must contain `main`"})
        checkpoint = (checkpoints or {}).get("main") if "checkpoints" in body \
            else body.get("checkpoint")
        checkpoint = checkpoint if isinstance(checkpoint, str) else ""
        recipe = body.get("recipe") if isinstance(body.get("recipe"), str) else ""
        cid = self.resolve_name(name)
        if cid is not None and not checkpoint:
            if not self.supported(cid):
                raise ApiError(500, {"error": f"Model '{name}' is not available on this "
                                              "system. Recipe not supported on Linux"})
            return cid
        if not name.startswith("user."):
            raise ApiError(400, {"error": "When registering a new model, the model name must "
                                          "include the `user` namespace, for example "
                                          f"`user.Phi-4-Mini-GGUF`. Received: {name}",
                                 "code": "unknown_model"})
        if not checkpoint or not recipe:
            raise ApiError(500, {"error": f"Model {name} is not registered with Lemonade "
                                          "Server. To register and install it, provide the "
                                          "`checkpoint` and `recipe` arguments."})
        if recipe == "llamacpp" and "gguf" in checkpoint.lower() and ":" not in checkpoint:
            raise ApiError(500, {"error": "You are required to provide a 'variant' in the "
                                          "checkpoint field when registering a GGUF model. The "
                                          "variant is provided as CHECKPOINT:VARIANT."})
        if recipe not in RECIPE_OPTION_KEYS or recipe in catalog.LINUX_UNSUPPORTED_RECIPES:
            raise ApiError(500, {"error": f"Model '{name}' cannot be used on this system "
                                          f"(recipe: {recipe}): not supported"})
        return self.register_user_model(name, body)

    async def h_pull(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        if not isinstance(body, dict):
            raise ApiError(400, {"error": "Request body must be a JSON object"})
        name = self.pull_name(body)
        stream = body.get("stream") is True
        if stream and body.get("subscribe") is False and self.since(10, 6):
            return json_response(self.start_job(name, body))  # a snapshot, at once (§2.8)
        try:
            cid = self.pull_target(name, body)
        except ApiError as exc:
            if not stream:
                raise
            error = exc.body

            async def refused():
                yield sse("error", error)
            return Response(200, content_type="text/event-stream", stream=refused())
        offline = bool(self.config().get("offline"))
        if not stream:
            if cid not in self.downloaded and not offline:
                self.log("Info", "ModelManager", f"Downloading {cid}")
                await asyncio.sleep(self.opts.pull_delay)
                self.downloaded.add(cid)
                self.log("Info", "ModelManager", f"Downloaded {cid}")
            return json_response({"status": "success", "model_name": name})
        return self.pull_stream(cid, name, offline)

    def pull_name(self, body: dict) -> str:
        """The model a pull names (`model`, or `model_name`), checked as lemond checks it."""
        name = body["model"] if "model" in body else body.get("model_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, {"error": "model_name is required", "code": "invalid_request"})
        if self.naming_spec() and is_reserved_registration_name(name):
            raise ApiError(400, {"error": "Model names with 'extra.' / 'builtin.' prefixes are "
                                          "reserved, including as bare-name parts of a 'user.' "
                                          "alias. Use 'user.<name>' for registration where "
                                          "<name> does not begin with 'extra.' or 'builtin.'. "
                                          f"Received: {name}"})
        if (body.get("checkpoint") or body.get("recipe")) and not name.startswith("user."):
            raise ApiError(400, {"error": "When providing 'checkpoint' or 'recipe', the model "
                                          "name must include the `user.` prefix, for example "
                                          f"`user.Phi-4-Mini-GGUF`. Received: {name}"})
        return name

    def pull_stream(self, cid: str, name: str, offline: bool) -> Response:
        """An SSE pull's answer: follow a running job, complete at once, or download."""
        if self.since(10, 7):
            job = self.jobs.get(f"model:{name}")
            if job is not None and job["status"] in ("downloading", "paused"):
                # an SSE pull of a model the server is already downloading follows that job
                return Response(200, content_type="text/event-stream",
                                stream=self.follow_job(job))
        if cid in self.downloaded or offline:
            async def done():
                yield sse("complete", {"status": "ok"})
            return Response(200, content_type="text/event-stream", stream=done())
        return Response(200, content_type="text/event-stream",
                        stream=self.pull_events(cid, name))

    @staticmethod
    def download_step(files: list[tuple[str, int]], index: int, got: int) -> dict:
        """One progress step (§2.9's fields): `got` bytes of file `index` (1-based) in,
        the files before it complete."""
        filename, size = files[index - 1]
        done_before = sum(size for _, size in files[:index - 1])
        total = sum(size for _, size in files)
        return dict(zip(STEP_FIELDS, (filename, index, len(files), got, size, total, 0,
                                      int((done_before + got) * 100 // total)), strict=True))

    async def download_steps(self, cid: str):
        """Simulated download progress: (progress event data, bytes of finished files)."""
        files = self.pull_files(cid)
        steps = max(1, 10 // len(files))
        pause = self.opts.pull_delay / (steps * len(files))
        done_before = 0
        for index, (_, size) in enumerate(files, start=1):
            for step in range(1, steps + 1):
                await asyncio.sleep(pause)
                yield self.download_step(files, index, size * step // steps), done_before
            done_before += size

    async def pull_events(self, cid: str, name: str):
        """An SSE pull: the download lives as long as the connection (closing cancels it).
        From v10.7 it also shows in `/v1/downloads` as a job."""
        generation = self.generation
        job = self.new_job(name, cid) if self.since(10, 7) else None
        self.pulls[cid] = {"model_name": cid, "percent": 0}
        self.log("Info", "ModelManager", f"Downloading {cid} ({len(self.pull_files(cid))} files)")
        finished = False
        try:
            data: dict[str, Any] = {}
            async for data, done_before in self.download_steps(cid):
                self.pulls[cid]["percent"] = data["percent"]
                if job is not None:
                    while job["status"] == "paused":
                        await asyncio.sleep(0.05)
                    if job["status"] == "cancelled":  # /v1/downloads/control cancel|remove
                        yield sse("error", {"error": "Download cancelled",
                                            "code": "download_cancelled"})
                        return
                    self.update_job(job, data, done_before)
                yield sse("progress", data)
            if generation == self.generation:
                self.downloaded.add(cid)
            finished = True
            if job is not None:
                self.finish_job(job, "completed")
            self.log("Info", "ModelManager", f"Downloaded {cid}")
            yield sse("complete", {**data, "percent": 100})
        finally:
            self.pulls.pop(cid, None)
            if not finished and (job is None or job["status"] != "cancelled"):
                if job is not None:
                    self.finish_job(job, "cancelled")
                self.cancelled_pulls.append(cid)
                self.log("Info", "ModelManager", f"Download of {cid} cancelled by the client")

    # ---- download jobs (v10.6+) ----------------------------------------------------------

    def _drop_jobs(self) -> None:
        for task in self.job_tasks.values():
            task.cancel()
        self.job_tasks = {}
        self.jobs = {}

    def new_job(self, name: str, cid: str | None = None) -> dict:
        """A `model:<name>` download job in its first state (lemond-api.md §2.9), named
        after the model name as requested."""
        first = (self.download_step(self.pull_files(cid), 1, 0) if cid is not None
                 else dict(zip(STEP_FIELDS, ("", 0, 0, 0, 0, 0, 0, 0), strict=True)))
        job = {"id": f"model:{name}", "type": "model", "model_name": name,
               "status": "downloading", "running": True, **first,
               "completed_files_bytes": 0, "cumulative_bytes_downloaded": 0,
               "overall_bytes_downloaded": 0, "complete": False}
        self.jobs[job["id"]] = job
        return job

    @staticmethod
    def update_job(job: dict, data: dict, done_before: int) -> None:
        job.update(data)
        job["completed_files_bytes"] = done_before
        job["cumulative_bytes_downloaded"] = done_before + data["bytes_downloaded"]
        job["overall_bytes_downloaded"] = (job["bytes_previously_downloaded"]
                                           + job["cumulative_bytes_downloaded"])

    def finish_job(self, job: dict, status: str) -> None:
        job["status"], job["running"] = status, False
        if status == "completed":
            # A finished job reads like its last progress step: the last file, fully
            # downloaded, and every total at the full size (also when nothing had to be
            # downloaded and no progress step ever ran).
            total = job["total_download_size"]
            cid = self.resolve_name(job["model_name"])
            if cid is not None:  # not when a user model was deleted meanwhile
                files = self.pull_files(cid)
                job.update(self.download_step(files, len(files), files[-1][1]))
            job.update(file_index=job["total_files"], bytes_downloaded=job["bytes_total"],
                       percent=100, complete=True, completed_files_bytes=total,
                       cumulative_bytes_downloaded=total,
                       overall_bytes_downloaded=job["bytes_previously_downloaded"] + total)
            # completed jobs linger briefly, then drop out of /v1/downloads
            asyncio.get_running_loop().call_later(
                JOB_LINGER_SECONDS,
                lambda: self.jobs.pop(job["id"]) if self.jobs.get(job["id"]) is job else None)

    def start_job(self, name: str, body: dict) -> dict:
        """`POST /v1/pull {"stream":true,"subscribe":false}`: start (or return) the
        server-owned download job of a model and answer its snapshot. The model's checks
        run in the job: a refused pull is a job in `error` (Server::start_download_job)."""
        job = self.jobs.get(f"model:{name}")
        if job is not None and job["status"] in ("downloading", "paused"):
            if job["status"] == "paused":  # pulling a paused job again resumes it
                job["status"], job["running"] = "downloading", True
                self.log("Info", "ModelManager", f"Resumed download job {job['id']}")
            return dict(job)  # a second pull for an active id returns the existing job
        try:
            cid, error = self.pull_target(name, body), None
        except ApiError as exc:
            cid, error = None, exc.body
        job = self.new_job(name, cid)
        if cid is not None and (cid in self.downloaded or self.config().get("offline")):
            self.finish_job(job, "completed")  # nothing to download
            return dict(job)
        task = asyncio.ensure_future(self._run_job(job, cid, error, self.generation))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.job_tasks[job["id"]] = task
        self.log("Info", "ModelManager", f"Started download job {job['id']}")
        return dict(job)

    async def _run_job(self, job: dict, cid: str | None, error: dict | None,
                       generation: int) -> None:
        try:
            if cid is None:
                await asyncio.sleep(0)  # the refusal comes from the worker, after the reply
                job.update(error or {})
                job["status"], job["running"] = "error", False
                self.log("Error", "DownloadManager",
                         f"worker error id={job['id']} error=\"{job.get('error')}\"")
                return
            async for data, done_before in self.download_steps(cid):
                while job["status"] == "paused":
                    await asyncio.sleep(0.05)
                self.update_job(job, data, done_before)
            if generation == self.generation:
                self.downloaded.add(cid)
            self.log("Info", "ModelManager", f"Downloaded {cid}")
            self.finish_job(job, "completed")
        finally:
            if self.job_tasks.get(job["id"]) is asyncio.current_task():
                del self.job_tasks[job["id"]]

    def stop_job(self, job: dict) -> None:
        if job["status"] in ("downloading", "paused"):
            self.finish_job(job, "cancelled")
            task = self.job_tasks.pop(job["id"], None)
            if task is not None:
                task.cancel()
            self.cancelled_pulls.append(job["model_name"])
            self.log("Info", "ModelManager", f"Download job {job['id']} cancelled")

    @staticmethod
    def job_progress(job: dict) -> dict:
        return {key: job[key] for key in STEP_FIELDS}

    async def follow_job(self, job: dict):
        """SSE events of a job someone else started (closing this does not cancel it)."""
        seen = None
        while True:
            status = job["status"]
            if status == "completed":
                yield sse("complete", self.job_progress(job))
                return
            if status == "cancelled":
                yield sse("error", {"error": "Download cancelled",
                                    "code": "download_cancelled"})
                return
            progress = self.job_progress(job)
            if status == "downloading" and progress != seen:
                seen = progress
                yield sse("progress", progress)
            await asyncio.sleep(0.05)

    async def h_downloads(self, req: Request) -> Response:
        return json_response([dict(job) for job in self.jobs.values()])

    async def h_downloads_control(self, req: Request) -> Response:
        body = parse_required_json(req.body)
        job_id = body.get("id") if isinstance(body, dict) else None
        action = body.get("action") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not job_id or not isinstance(action, str) \
                or not action:
            raise ApiError(400, {"error": "Both 'id' and 'action' are required"})
        if action not in JOB_ACTIONS:
            raise ApiError(400, {"error": "Unsupported download action"})
        job = self.jobs.get(job_id)
        if action == "remove":
            if job is None:
                return json_response({"status": "ok", "missing": True})
            self.stop_job(job)
            del self.jobs[job_id]
            return json_response({"status": "ok"})
        if job is None:
            raise ApiError(404, {"error": "Download not found"})
        if action == "pause" and job["status"] == "downloading":
            job["status"], job["running"] = "paused", False
            self.log("Info", "ModelManager", f"Paused download job {job_id}")
        elif action == "cancel":
            self.stop_job(job)
        return json_response({"status": "ok"})

