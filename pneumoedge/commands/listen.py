"""`pneumoedge listen` (a DICOM node) and `pneumoedge send-results` (re-send what a PACS missed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from pneumoedge.commands.options import (
    CLINICAL_NOTE,
    Device,
    Models,
    Precision,
    Site,
    UserError,
    model_arg,
    stderr,
    user_errors,
)
from pneumoedge.network import is_loopback

_INSTALL = "the DICOM node needs the pacs extra: pip install 'pneumoedge[pacs]'"

SendTo = Annotated[
    Optional[str],
    typer.Option("--send-to", help="Where results go: AET@host:port of the PACS, e.g. ORTHANC@127.0.0.1:4242.", show_default=False),
]
Aet = Annotated[str, typer.Option("--aet", help="This node's AE title (also the calling AE title when sending).")]


def _require_pacs() -> None:
    try:
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError:
        raise UserError(_INSTALL) from None


def _destination(text: Optional[str]):
    from pneumoedge.pacs.send import parse_destination

    if text is None:
        return None
    try:
        return parse_destination(text)
    except ValueError as exc:
        raise UserError(f"--send-to: {exc}") from None


def _check_aet(aet: str) -> str:
    aet = aet.strip()
    if not aet or len(aet) > 16 or "\\" in aet or not aet.isprintable():
        raise UserError(f"--aet {aet!r}: an AE title is 1 to 16 printable characters without a backslash")
    return aet


def _allowed(allow: Optional[str], host: str) -> list:
    """--allow as receive.Peers ([] lets anyone in: only on loopback, or with an explicit 'any')."""
    from pneumoedge.pacs.receive import parse_allow

    entries = [a.strip() for a in (allow or "").split(",") if a.strip()]
    if [e.lower() for e in entries] == ["any"]:
        return []
    if not entries and not is_loopback(host):
        raise UserError(
            f"--host {host} lets other computers connect: say who may send with --allow, "
            "comma-separated AE titles, each optionally AET@address (e.g. --allow ORTHANC@10.0.0.5), or --allow any to accept every calling AE title"
        )
    if any(e.lower() == "any" for e in entries):
        raise UserError("--allow any cannot be combined with AE titles")
    try:
        return parse_allow(entries)
    except ValueError as exc:
        raise UserError(f"--allow {exc}") from None


def _quiet_pynetdicom(verbose: bool) -> None:
    """pynetdicom logs every refused connection as errors; our own messages say it in one line."""
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.CRITICAL)


def _setup_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    pacs_log = logging.getLogger("pneumoedge.pacs")
    pacs_log.handlers[:] = [handler]
    pacs_log.setLevel(logging.INFO)
    pacs_log.propagate = False


# Long only in its signature and help: the verb's option table (typer reads it); the body parses, loads and runs a pacs Node.
def listen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder: results file, spool, outbox (created).")],
    aet: Aet = "PNEUMOEDGE",
    port: Annotated[int, typer.Option(min=1, max=65535, help="DICOM port to listen on.")] = 11112,
    host: Annotated[
        str,
        typer.Option(help="Address to listen on: 127.0.0.1 (this computer only), or another (0.0.0.0: every interface), which needs --allow."),
    ] = "127.0.0.1",
    allow: Annotated[
        Optional[str],
        typer.Option(
            help="Who may send: comma-separated calling AE titles, each optionally from one address (AET or AET@address), or 'any'. "
            "Required with a --host other than this computer; without it, on 127.0.0.1, any calling AE title.",
        ),
    ] = None,
    send_to: SendTo = None,
    heatmaps: Annotated[
        bool, typer.Option(help="Also send a Secondary Capture of the heatmap overlay (when the model can explain).")
    ] = False,
    model: Models = None,
    device: Device = "cpu",
    precision: Precision = "auto",
    site: Site = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="onnxruntime threads per model run. Default: every core.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Results file format: jsonl or csv.")] = "jsonl",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Most instances classified in one model run.")] = 8,
    retry_max: Annotated[float, typer.Option(min=0.1, help="Longest pause (s) between attempts to reach --send-to.")] = 60.0,
    max_attempts: Annotated[
        int, typer.Option(min=1, help="Attempts to store one result object that the PACS fails to take before it moves to OUT/failed/.")
    ] = 8,
    keep_sent: Annotated[
        float, typer.Option(min=0, help="Days confirmed result objects (with patient data) stay in OUT/sent/; 0 removes them once confirmed.")
    ] = 30.0,
    check: Annotated[
        bool, typer.Option("--check", help="Check the setup (model, folder, port, C-ECHO to --send-to), say what is wrong, exit.")
    ] = False,
    verbose_dicom: Annotated[bool, typer.Option(help="Log pynetdicom's association details.")] = False,
) -> None:
    """Run a DICOM node: receive chest X-rays (CR, DX) from a PACS, classify them, send results back.

    Each received instance is written to OUT/spool (fsynced) before it is acknowledged, then
    classified exactly as `infer` does; one row per SOP Instance UID goes to OUT/results.jsonl
    (infer's columns plus the UIDs and calling AE title). Non-chest instances get a `skipped`
    row. For each classified image a Structured Report (finding, probabilities, threshold, model
    identity, "decision support, not a diagnosis") goes to OUT/outbox and, with --send-to, into
    the source study; with --heatmaps also the overlay; an image that cannot be decoded gets an
    SR saying it was not analysed. Results the PACS cannot take now are kept and retried; one it
    refuses for good (or after --max-attempts) moves to OUT/failed/ (send-results --retry-failed).
    The same instance sent twice gives one row and one SR. Listens on 127.0.0.1 unless --host
    says otherwise (then --allow is required); associations for another called AE title are
    refused. Stop with Ctrl-C or SIGTERM (the current batch is finished; a summary is printed).
    """
    with user_errors():
        _require_pacs()
        from pneumoedge.pacs.node import Node, NodeConfig, check_setup
        from pneumoedge.pacs.send import SendError
        from pneumoedge.runtime.loading import load

        _quiet_pynetdicom(verbose_dicom)
        aet = _check_aet(aet)
        destination = _destination(send_to)
        fmt = fmt.lower()
        if fmt not in ("jsonl", "csv"):
            raise UserError(f"--format must be jsonl or csv, got {fmt!r}")
        allowed = _allowed(allow, host)
        ensemble = load(model_arg(model), device=device.lower(), precision=precision, threads=threads, site=site)
        config = NodeConfig(
            out=out, aet=aet, host=host, port=port, fmt=fmt, allow=allowed, send_to=destination,
            heatmaps=heatmaps, retry_max=retry_max, batch_size=batch, keep_sent_days=keep_sent, max_attempts=max_attempts,
        )
        if check:
            try:
                check_setup(config, say=lambda line: stderr.print(line, highlight=False))
            except SendError as exc:
                raise UserError(str(exc)) from None
            if heatmaps and not getattr(ensemble, "can_explain", False):
                stderr.print(f"note: --heatmaps: {getattr(ensemble, 'explain_note', '') or 'this model gives no heatmaps'}; SRs only", highlight=False, soft_wrap=True)
            return
        _setup_logging()
        node = Node(ensemble, config)
        try:
            node.start()
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    summary = node.run_until_signal(
        announce=lambda: stderr.print(f"listening as {aet} on {host}:{port}; results in {out}. Ctrl-C or SIGTERM stops. {CLINICAL_NOTE}", highlight=False)
    )
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    labels = ", ".join(f"{k} {v}" for k, v in sorted(summary["labels"].items())) or "none"
    stderr.print(
        f"pneumoedge listen: received {summary['received']}, classified {summary['ok']} ({labels}), "
        f"skipped {summary['skipped']}, errors {summary['errors']}, duplicates {summary['duplicates']}, "
        f"result objects sent {summary['objects_sent']}, waiting in the outbox {summary['outbox']}, "
        f"in failed/ {summary['objects_failed']}, associations refused {summary['associations_refused']}, "
        f"left in the spool {summary['spool']}; time spent classifying {summary['classify_s']:.1f} s, "
        f"building result objects {summary['report_s']:.1f} s; results in {summary['results']}",
        highlight=False, soft_wrap=True,
    )
    if summary["last_send_error"] and summary["outbox"]:
        stderr.print(f"last send error: {summary['last_send_error']}", highlight=False, soft_wrap=True)
    stderr.print(f"[yellow]{CLINICAL_NOTE}[/]")


def send_results(
    folder: Annotated[Path, typer.Argument(help="A `listen --out` folder.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="AET@host:port of the PACS.", show_default=False)],
    aet: Aet = "PNEUMOEDGE",
    resend_all: Annotated[bool, typer.Option("--all", help="Also send again what was sent before (the PACS keeps one copy).")] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Also send FOLDER/failed/ again (objects the PACS did not take; see failed/failed.log).")
    ] = False,
) -> None:
    """Send the result objects waiting in FOLDER/outbox (with --retry-failed also FOLDER/failed, with --all also FOLDER/sent) to a PACS.

    Objects the PACS refuses for good move to FOLDER/failed/ (the reason in failed/failed.log).
    Exit codes: 0 everything sent; 1 some objects are still waiting or failed (the reason is printed); 2 usage error.
    """
    with user_errors():
        _require_pacs()
        from pneumoedge.pacs.send import Outbox, SendError, SendStats

        _quiet_pynetdicom(False)
        aet = _check_aet(aet)
        destination = _destination(to)
        if not (folder / "outbox").is_dir():
            raise UserError(f"{folder} is not a `pneumoedge listen --out` folder (it has no outbox/)")
        outbox = Outbox(folder)
        files = (
            outbox.pending()
            + (outbox.failed_files() if retry_failed else [])
            + (sorted(outbox.sent.glob("*.dcm")) if resend_all else [])
        )
        stats = SendStats()
        try:
            outbox.send_pending(destination, aet, stats=stats, files=files)
            problem = stats.last_error if stats.failures and stats.last_error else ""
        except SendError as exc:
            problem = str(exc)
    left, failed = len(outbox.pending()), len(outbox.failed_files())
    stderr.print(
        f"sent {stats.sent} result object(s) to {destination}; {left} waiting in {folder / 'outbox'}; "
        f"{failed} in {folder / 'failed'}" + (f" (why: {folder / 'failed' / 'failed.log'}; --retry-failed sends them again)" if failed else ""),
        highlight=False, soft_wrap=True,
    )
    if problem:
        stderr.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
    raise typer.Exit(1 if left or problem or stats.failed or (retry_failed and failed) else 0)


def register(app: typer.Typer) -> None:
    app.command("listen")(listen)
    app.command("send-results")(send_results)
