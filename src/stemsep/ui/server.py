"""The `stemsep ui` web server: a page to separate songs and practise with their stems.

A Starlette app (:func:`create_app`) serves the page's own static files (no other host is
ever contacted: :mod:`stemsep.ui.security` forbids it) and a small JSON API:

=======================================  ====================================================
``GET  /api/config``                     models (downloaded first, stems and ``no_<stem>``
                                         practice tracks), formats, initial choices, limits
``POST /api/jobs?name=&model=...``       queue a song; the body is the file's bytes, as is
``GET  /api/jobs``                       the queue: state, progress, remaining seconds
``POST /api/jobs/{id}/cancel``           cancel a queued or running separation
``GET  /api/separations``                earlier separations, newest first (their records)
``DELETE /api/separations/{id}``         delete one
``GET  /api/separations/{id}/zip``       all its stems in one zip, made while sent
``GET  /api/separations/{id}/mix``       its stems summed with ``?gains=`` (one per stem), a WAV
``GET  /files/{id}/{file}``              one stem file
``POST /api/replicate``                  set the Replicate model and token until the server stops
=======================================  ====================================================

:func:`serve` binds the socket, prints the address (with the token off loopback), opens
the browser and runs uvicorn until Ctrl-C.
"""

from __future__ import annotations

import errno
import shutil
import socket
import sys
import webbrowser
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stemsep import catalogue, weights
from stemsep.choices import DEFAULT_FORMAT, OUTPUT_FORMATS
from stemsep.errors import StemsepError
from stemsep.remote import MAX_UPLOAD_BYTES
from stemsep.stems import stem_choices
from stemsep.ui.engines import CUSTOM, LocalEngine, ModelOptions, ReplicateEngine
from stemsep.ui.jobs import Job, JobQueue, Options
from stemsep.ui.library import Library, NotFound, safe_filename
from stemsep.ui.mixdown import mixdown
from stemsep.ui.security import Guard, is_loopback

STATIC = Path(__file__).parent / "static"
FREE_SPACE_MARGIN = 64 << 20  # bytes kept free beyond an upload
MAX_GAIN = 4.0  # the loudest a stem can be made in an exported mix (+12 dB)


@dataclass(frozen=True)
class Settings:
    """The server's settings: the command line's options."""

    output_dir: Path = Path("separated")
    host: str = "127.0.0.1"
    port: int = 8080
    model: str | None = None  # the page's initial model (a catalogue name); the custom files win
    model_options: ModelOptions = field(default_factory=ModelOptions)
    tta: bool = False
    output_format: str = DEFAULT_FORMAT
    max_upload_bytes: int = 1 << 30
    mixer_minutes: float = 20.0
    token: str | None = None  # required off loopback (see stemsep.ui.security)


class UI:
    """The state behind the routes: the output folder, the engines and the queue."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.library = Library(settings.output_dir)
        self.local = LocalEngine(settings.model_options)
        self.replicate = ReplicateEngine()
        self.custom_stems: tuple[str, ...] | None = None
        options = settings.model_options
        if options.checkpoint is not None or options.config is not None:
            self.custom_stems = self.local.separator(CUSTOM).stems  # a bad file: one sentence at start
        elif settings.model is not None:
            catalogue.get(settings.model)
        record_options = {"overlap": options.overlap} if options.overlap is not None else {}
        self.queue = JobQueue(self.library, {"local": self.local, "replicate": self.replicate}, record_options)

    def models(self) -> list[dict[str, Any]]:
        """The models to offer: the custom files, then the downloaded ones, then the rest."""
        rows = []
        if self.custom_stems is not None:
            name = self.settings.model_options.checkpoint.name
            rows.append(_model_row(CUSTOM, f"{name} (the files given at start)", self.custom_stems, True, None))
        listed = [(m, catalogue.is_downloaded(m)) for m in catalogue.MODELS.values()]
        for model, downloaded in sorted(listed, key=lambda pair: not pair[1]):
            rows.append(_model_row(model.name, f"{model.name}: {model.title}", model.stems, downloaded, model.size))
        return rows

    def offline(self) -> bool:
        """Whether models that are not downloaded stay so (else they download on first use)."""
        offline = self.settings.model_options.offline
        return weights.offline_by_default() if offline is None else offline

    def initial_model(self) -> str:
        return CUSTOM if self.custom_stems is not None else self.settings.model or catalogue.DEFAULT

    def replicate_state(self) -> dict[str, Any]:
        """The Replicate settings for the page; `error` says why the model's choices are unknown."""
        engine = self.replicate
        try:
            choices, error = (engine.model_choices() if engine.configured else []), None
        except StemsepError as exc:
            choices, error = [], str(exc)
        return {"configured": engine.configured, "model": engine.model, "choices": choices, "error": error,
                "stems": {name: list(catalogue.MODELS[name].stems) for name in choices if name in catalogue.MODELS},
                "practice": {name: _practice(catalogue.MODELS[name].stems) for name in choices if name in catalogue.MODELS},
                "max_upload_bytes": MAX_UPLOAD_BYTES}


def _practice(stems: tuple[str, ...]) -> list[str]:
    """The practice tracks a model giving `stems` offers, named by the library."""
    return list(stem_choices(stems)[len(stems):])


def _model_row(name: str, label: str, stems: tuple[str, ...], downloaded: bool, size: int | None) -> dict[str, Any]:
    return {"name": name, "label": label, "stems": list(stems), "practice": _practice(stems),
            "downloaded": downloaded, "size": size}


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _ui(request: Request) -> UI:
    return request.app.state.ui


# routes --------------------------------------------------------------------------------------


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html")


async def config(request: Request) -> Response:
    ui = _ui(request)
    s = ui.settings
    replicate = await run_in_threadpool(ui.replicate_state)  # may ask Replicate for the model's schema
    return JSONResponse({
        "models": ui.models(), "model": ui.initial_model(), "formats": list(OUTPUT_FORMATS), "format": s.output_format,
        "tta": s.tta, "mixer_minutes": s.mixer_minutes, "max_upload_bytes": s.max_upload_bytes,
        "replicate": replicate, "output_dir": str(ui.library.root), "offline": ui.offline(),
    })


async def create_job(request: Request) -> Response:
    ui = _ui(request)
    q = request.query_params
    song = safe_filename(q.get("name", ""))
    engine = q.get("engine", "local")
    output_format = q.get("format", ui.settings.output_format)
    stems = tuple(s.strip() for s in q.get("stems", "").split(",") if s.strip()) or None
    model = q.get("model") or (ui.initial_model() if engine == "local" else "")
    if engine not in ("local", "replicate"):
        return _error(f"unknown engine {engine!r}")
    if output_format not in OUTPUT_FORMATS:
        return _error(f"unknown output format {output_format!r}; the formats are {', '.join(OUTPUT_FORMATS)}")
    if engine == "local" and model != CUSTOM:
        try:
            catalogue.get(model)
        except StemsepError as exc:
            return _error(str(exc))
    if engine == "replicate" and not ui.replicate.configured:
        return _error("no Replicate model and API token are set for this page")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return _error("the upload must state its length", 411)
    size = int(length)
    limit = MAX_UPLOAD_BYTES if engine == "replicate" else ui.settings.max_upload_bytes
    if size > limit:
        where = "Replicate's" if engine == "replicate" else "this page's"
        return _error(f"{song}: the file is larger than {where} upload limit of {_megabytes(limit)}", 413)
    free = shutil.disk_usage(ui.library.root).free
    if size + FREE_SPACE_MARGIN > free:
        return _error(f"{song}: not enough free disk space in {ui.library.root} for the upload "
                      f"({_megabytes(size)} needed, {_megabytes(free)} free)", 507)
    path = ui.library.temp_file(song)
    received = 0
    try:
        with open(path, "wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > size:
                    raise ValueError("more bytes than stated")
                out.write(chunk)
        if received != size:
            raise ValueError("fewer bytes than stated")
    except (ClientDisconnect, ValueError, OSError) as exc:
        ui.library.discard_temp(path)
        return _error(f"{song}: the upload did not arrive whole ({exc})")
    options = Options(model=model, stems=stems, output_format=output_format, tta=q.get("tta") in ("1", "true"),
                      engine=engine)
    job = ui.queue.add(Job(song, path, options))
    return JSONResponse(job.to_json(), status_code=202)


async def list_jobs(request: Request) -> Response:
    return JSONResponse({"jobs": _ui(request).queue.listing()})


async def cancel_job(request: Request) -> Response:
    queue = _ui(request).queue
    job = queue.get(request.path_params["job_id"])
    if job is None:
        return _error("no such job", 404)
    queue.cancel(job)
    return JSONResponse(job.to_json())


async def list_separations(request: Request) -> Response:
    return JSONResponse({"separations": [r.to_json() for r in _ui(request).library.records()]})


async def separation(request: Request) -> Response:
    library = _ui(request).library
    sep_id = request.path_params["sep_id"]
    try:
        if request.method == "DELETE":
            library.delete(sep_id)
            return JSONResponse({"deleted": sep_id})
        return JSONResponse(library.record(sep_id).to_json())
    except NotFound:
        return _error("no such separation", 404)


async def zip_stems(request: Request) -> Response:
    library = _ui(request).library
    sep_id = request.path_params["sep_id"]
    try:
        library.stem_files(sep_id)
    except NotFound:
        return _error("no such separation", 404)
    chunks = (chunk for chunk in library.zip_stream(sep_id) if chunk)
    return StreamingResponse(chunks, media_type="application/zip",
                             headers={"content-disposition": f'attachment; filename="{sep_id}.zip"'})


async def mix(request: Request) -> Response:
    """The stems summed with `?gains=` (one per stem, in the record's order), as a WAV download."""
    library = _ui(request).library
    sep_id = request.path_params["sep_id"]
    try:
        record, paths = library.record(sep_id), library.stem_files(sep_id)
    except NotFound:
        return _error("no such separation", 404)
    try:
        gains = [float(g) for g in request.query_params.get("gains", "").split(",")]
    except ValueError:
        return _error("gains must be numbers, one per stem")
    if not all(0 <= g <= MAX_GAIN for g in gains):
        return _error(f"gains must be from 0 to {MAX_GAIN}")
    dest = library.temp_file(f"{Path(record.song).stem}_mix.wav")
    try:
        await run_in_threadpool(mixdown, paths, gains, dest)
    except StemsepError as exc:
        library.discard_temp(dest)
        return _error(str(exc))
    return FileResponse(dest, filename=dest.name, background=BackgroundTask(library.discard_temp, dest))


async def stem_file(request: Request) -> Response:
    try:
        path = _ui(request).library.stem_file(request.path_params["sep_id"], request.path_params["filename"])
    except NotFound:
        return _error("no such file", 404)
    return FileResponse(path, filename=path.name)


async def set_replicate(request: Request) -> Response:
    ui = _ui(request)
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("not an object")
        ui.replicate.configure(str(body.get("model") or ""), str(body.get("token") or ""))
        return JSONResponse(await run_in_threadpool(ui.replicate_state))
    except ValueError:
        return _error("the request is not JSON")
    except StemsepError as exc:
        return _error(str(exc))


def create_app(settings: Settings) -> Starlette:
    """The app for `settings`; its state's `ui` holds the queue and the output folder."""
    ui = UI(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        ui.queue.close()

    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/jobs", list_jobs),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/api/separations", list_separations),
        Route("/api/separations/{sep_id}", separation, methods=["GET", "DELETE"]),
        Route("/api/separations/{sep_id}/zip", zip_stems),
        Route("/api/separations/{sep_id}/mix", mix),
        Route("/api/replicate", set_replicate, methods=["POST"]),
        Route("/files/{sep_id}/{filename}", stem_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(Guard, host=settings.host, port=settings.port, token=settings.token)]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.ui = ui
    return app


# running it ----------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: any free port); a busy port is one sentence."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise StemsepError(f"cannot listen on {host}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise StemsepError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def serve(settings: Settings, open_browser: bool = True) -> None:
    """Run the server until interrupted: bind, print the address, open the browser."""
    import secrets

    import uvicorn

    sock = bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    token = None if is_loopback(settings.host) else secrets.token_urlsafe(18)
    settings = replace(settings, port=port, token=token)
    app = create_app(settings)
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    if token:
        print(f"stemsep ui: warning: listening on {settings.host}, not only this computer: anyone who can reach "
              "it and has the address below can use it", file=sys.stderr)
    print(f"stemsep ui: {url}  (stems in {app.state.ui.library.root}; Ctrl-C stops)", flush=True)
    if open_browser:
        webbrowser.open(url)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _megabytes(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n} bytes"
