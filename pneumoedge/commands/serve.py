"""`pneumoedge serve`: the model behind a local web page and a JSON API (needs the [serve] extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from pneumoedge.commands.options import CLINICAL_NOTE, Device, Models, Precision, Site, UserError, model_arg, stderr, user_errors
from pneumoedge.network import is_loopback
from pneumoedge.runtime.loading import load


# Long only in its signature: the verb's option table (typer reads it); the body parses, loads and calls serve_forever.
def serve(
    model: Models = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs --token or --insecure-no-auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port, printed at start).")] = 8000,
    token: Annotated[
        Optional[str],
        typer.Option(
            envvar="PNEUMOEDGE_SERVE_TOKEN",
            help="Require this bearer token on the page and every API call (browsers: any user name, the token "
            "as password). Prefer the environment variable: command lines are visible to other users.",
            show_default=False,
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Listen on a non-loopback address WITHOUT authentication.")
    ] = False,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, in MB; larger ones get 413 while uploading.")] = 64.0,
    queue: Annotated[int, typer.Option(min=1, help="Requests admitted to the model at once (body read, waiting or running); more get 503.")] = 32,
    upload_deadline: Annotated[
        float, typer.Option(min=1, help="Seconds a whole request body may take; slower uploads get 408.")
    ] = 120.0,
    min_upload_rate: Annotated[
        float, typer.Option(min=0, help="Slowest average upload rate accepted, in KB/s, counted after the first 10 s (0: no minimum); slower uploads get 408.")
    ] = 16.0,
    max_connections: Annotated[
        int, typer.Option(min=2, help="Open connections at once (uvicorn's limit_concurrency); more get 503. Bounds the memory of bodies being read.")
    ] = 64,
    header_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a connection may take to send a request's headers before it is closed.")
    ] = 10.0,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Also answer requests for this host name (repeatable), e.g. the name clients or a reverse proxy use. "
            "By default only the --host address (and on loopback localhost, 127.0.0.1, ::1; on 0.0.0.0 any IP address "
            "and this computer's name): other names are refused (DNS rebinding).",
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(min=1, help="Threads running the model at once. Default: as infer runs batches (one per core with 1 thread each).", show_default=False),
    ] = None,
    threads: Annotated[
        Optional[int],
        typer.Option(min=1, help="onnxruntime threads per model run. Default: as infer (what `pneumoedge tune` measured, else 1).", show_default=False),
    ] = None,
    keep_uploads: Annotated[
        Optional[Path],
        typer.Option(help="Also write every upload to this folder as REQUESTID-N.KIND. Default: uploads stay in memory only."),
    ] = None,
    device: Device = "cpu",
    precision: Precision = "auto",
    site: Site = None,
) -> None:
    """Serve the model: a page at http://HOST:PORT/ to drop images on, and a JSON API.

    POST /api/v1/predict (multipart files, or one image body with its Content-Type), GET /api/v1/model,
    GET /healthz, GET /readyz, schema at /api/v1/openapi.json. Results are the rows of `infer`.
    Logs hold request ids, sizes, timings and statuses, never file names. Stop with Ctrl-C.
    """
    with user_errors():
        try:
            from pneumoedge.serve import ServeSettings
            from pneumoedge.serve import server
            from pneumoedge.serve.settings import HostPolicy
        except ModuleNotFoundError as exc:
            raise UserError(f"serve needs the [serve] extra ({exc.name} is missing): pip install \"pneumoedge[serve]\"") from None
        secured = token is not None
        if not is_loopback(host) and not secured and not insecure_no_auth:
            raise UserError(f"--host {host} is reachable from other computers: give --token (or PNEUMOEDGE_SERVE_TOKEN), or --insecure-no-auth")
        if keep_uploads is not None and not keep_uploads.is_dir():
            raise UserError(f"--keep-uploads {keep_uploads}: no such folder")
        # Loaded once, at start: the same loader, defaults and one-line errors as `infer`, so the
        # same members run (precision "auto" may pick int8 on a VNNI machine) and results match.
        ensemble = load(model_arg(model), device=device.lower(), precision=precision, threads="auto" if threads is None else threads, site=site)
        try:
            settings = ServeSettings(
                max_upload_bytes=int(max_upload_mb * 2**20),
                queue_limit=queue,
                inference_threads=workers or ensemble.configuration.runners,
                token=token,
                keep_uploads=keep_uploads,
                body_deadline_s=upload_deadline,
                min_upload_rate=min_upload_rate * 1024,
                max_connections=max_connections,
                header_timeout_s=header_timeout,
                hosts=HostPolicy.for_bind(host, allowed_host or ()),
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        try:
            listener = server.open_listener(host, port)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if not is_loopback(host) and not secured:
        stderr.print(f"[bold red]warning:[/] serving on {host} WITHOUT authentication: anyone who can reach it can upload images")
    bound_host, bound_port = listener.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    stderr.print(f"pneumoedge serve: http://{shown}:{bound_port}/ (model {ensemble.name}); Ctrl-C stops", highlight=False, soft_wrap=True)
    stderr.print(f"model runs: {ensemble.configuration.describe()}; serve runs one image per run, {settings.threads} at once", highlight=False, soft_wrap=True)
    stderr.print(f"[yellow]{CLINICAL_NOTE}[/]")
    server.serve_forever(ensemble, settings, listener)
    stderr.print("pneumoedge serve: stopped")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
