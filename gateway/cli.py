"""The ``passerelle`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from gateway import config as config_mod
from gateway.core.errors import ConfigError, MessageError, StoreError
from gateway.core.logging import configure as configure_logging
from gateway.hl7.er7 import split_messages

if TYPE_CHECKING:  # the CLI imports the engine only for the commands that run it
    from gateway.engine.steps import FhirMapping

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway

    os.umask(0o077)  # journal, repository, audit trail and written files: readable by this account only
    try:
        cfg = config_mod.load(args.config)
        configure_logging(cfg.settings.log_level)
        gateway = Gateway(
            cfg,
            data_dir=args.data_dir,
            mllp_port=args.mllp_port,
            http_port=args.http_port,
            journal_url=args.journal,
            store_dsn=args.store,
        )
    except ConfigError as exc:
        print(f"passerelle: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _install_loop()
    # The journal and file writers are threads: a short GIL switch interval keeps the event loop's
    # wait for the GIL (and so the ACK latency) well under the default 5 ms.
    sys.setswitchinterval(0.0005)
    try:
        asyncio.run(gateway.run_until_signalled())
    except ConfigError as exc:
        print(f"passerelle: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:  # e.g. PostgreSQL or NATS unreachable at start-up; the URL is named
        print(f"passerelle: cannot start: {exc.message}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _parse_mllp_url(url: str, schemes: tuple[str, ...] = ("mllp",)) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname or not parts.port:
        raise ValueError(f"expected {' or '.join(s + '://HOST:PORT' for s in schemes)}, got {url!r}")
    return parts.hostname, parts.port


def _send_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """mllps:// is MLLP over TLS; --tls-ca (else the system store), --tls-cert/--tls-key for mTLS."""
    from gateway.core.tls import client_context

    settings = {k: v for k, v in (("ca", args.tls_ca), ("cert", args.tls_cert), ("key", args.tls_key)) if v}
    if not args.to.startswith("mllps://"):
        if settings:
            raise ValueError("--tls-ca, --tls-cert and --tls-key go with an mllps:// address")
        return None
    if ("cert" in settings) != ("key" in settings):
        raise ValueError("--tls-cert and --tls-key go together")
    try:
        return client_context(settings, where="--tls")
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc


async def _send(
    files: Sequence[str],
    host: str,
    port: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    *,
    as_json: bool = False,
) -> int:
    from connectors.mllp.client import MllpClient
    from gateway.hl7.ack import parse_ack

    client = MllpClient(host, port, ssl=tls)
    worst = EXIT_OK
    try:
        for name in files:
            data = await asyncio.to_thread(Path(name).read_bytes)
            for index, raw in enumerate(split_messages(data), 1):
                try:
                    answer = await client.send(raw, timeout=timeout)
                except (TimeoutError, OSError, ConnectionError) as exc:
                    why = f"{type(exc).__name__} {exc}"
                    print(f"{name}: no answer from {host}:{port}: {why}", file=sys.stderr)
                    return EXIT_FAIL
                try:
                    code = parse_ack(answer)[0]
                except MessageError:
                    code = ""
                text = answer.decode("latin-1")
                if as_json:
                    out = {"file": name, "message": index, "code": code, "ack": text}
                    print(orjson.dumps(out).decode())
                else:
                    print(text.replace("\r", "\n").rstrip("\n"))
                    print()
                if code not in ("AA", "CA"):
                    worst = EXIT_FAIL
    finally:
        await client.close()
    return worst


def _cmd_send(args: argparse.Namespace) -> int:
    try:
        args.to = args.to or _client_addresses(args.config)["mllp"]
        host, port = _parse_mllp_url(args.to, ("mllp", "mllps"))
        tls = _send_tls(args)
    except ConfigError as exc:
        print(f"passerelle send: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"passerelle send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name in args.files:
        if not Path(name).is_file():
            print(f"passerelle send: no such file: {name}", file=sys.stderr)
            return EXIT_USAGE
    return asyncio.run(_send(args.files, host, port, args.timeout, tls, as_json=args.json))


def _token(args: argparse.Namespace) -> str | None:
    """--token, else $PASSERELLE_TOKEN, else the first-start admin token where the gateway writes it:
    the config's auth.admin_token_file, else admin-token in --data-dir, the config's data_dir or ./var."""
    if args.token:
        return str(args.token)
    if os.environ.get("PASSERELLE_TOKEN"):
        return os.environ["PASSERELLE_TOKEN"]
    cfg = _client_config(getattr(args, "config", None))
    if cfg is not None:
        settings = cfg.overridden(data_dir=args.data_dir).settings
    else:
        settings = config_mod.defaults(data_dir=args.data_dir)
    path = settings.auth.admin_token_file
    try:
        return path.read_text("ascii").strip() or None
    except OSError:
        return None


DEFAULT_MLLP = "mllp://127.0.0.1:2575"


def _config_path(given: str | None) -> Path | None:
    """--config, else ./config.yaml when there is one."""
    if given:
        return Path(given)
    here = Path("config.yaml")
    return here if here.is_file() else None


def _reachable(host: object) -> str:
    """Where a client reaches a server bound to ``host``: a wildcard address means this machine."""
    text = str(host or "")
    if text in ("", "0.0.0.0", "::", "*"):  # noqa: S104 - read from a config, not bound here
        return "127.0.0.1"
    return f"[{text}]" if ":" in text else text


def _addresses_of(cfg: config_mod.Config | None) -> dict[str, str]:
    """The gateway's MLLP and HTTP addresses and data directory, as a config says (else the defaults)."""
    settings = cfg.settings if cfg is not None else config_mod.defaults()
    http = settings.http
    api = f"{'https' if http.tls else 'http'}://{_reachable(http.host)}:{http.port}"
    out = {"mllp": DEFAULT_MLLP, "api": api, "data_dir": str(settings.data_dir)}
    for src in cfg.data["sources"] if cfg is not None else ():
        if src["type"] == "mllp":  # the MLLP source's own settings (connectors.mllp)
            scheme = "mllps" if src.get("tls") else "mllp"
            out["mllp"] = f"{scheme}://{_reachable(src.get('host'))}:{src.get('port', 2575)}"
            break
    return out


def _client_config(given: str | None) -> config_mod.Config | None:
    """--config, else ./config.yaml when present, validated; None without one.
    Raises ConfigError for a config named but missing or invalid."""
    path = _config_path(given)
    return None if path is None else config_mod.load(path)


def _client_addresses(given: str | None) -> dict[str, str]:
    """Addresses from --config (else ./config.yaml when present); the defaults without one."""
    return _addresses_of(_client_config(given))


def _help_addresses() -> dict[str, str]:
    """For --help: what ./config.yaml says; a missing or broken file shows the defaults."""
    try:
        return _addresses_of(config_mod.load("config.yaml"))
    except ConfigError:
        return _addresses_of(None)


async def _api(method: str, base: str, path: str, token: str | None = None) -> tuple[int, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.request(method, base.rstrip("/") + path) as resp,
    ):
        body = await resp.read()
        try:
            return resp.status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return resp.status, body.decode("utf-8", "replace")


def _call_api(
    method: str, base: str, path: str, token: str | None = None, *, as_json: bool = True
) -> tuple[int, Any]:
    """(exit code, body); the body is printed as JSON with ``as_json``, an error's words otherwise."""
    try:
        status, body = asyncio.run(_api(method, base, path, token))
    except OSError as exc:
        print(f"passerelle: cannot reach the gateway at {base}: {exc}", file=sys.stderr)
        return EXIT_FAIL, None
    if as_json:
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    elif status >= 400:
        issues = body.get("issue", ()) if isinstance(body, dict) else ()
        text = "; ".join(str(i.get("diagnostics", "")) for i in issues) or str(body)
        print(f"passerelle: {base}{path}: HTTP {status}: {text}", file=sys.stderr)
    if status == 401 and token is None:
        print(
            "passerelle: no token found: pass --token, set PASSERELLE_TOKEN, or name the gateway's data "
            "directory (--data-dir, or --config) where its admin-token is",
            file=sys.stderr,
        )
    return (EXIT_OK if status < 400 else EXIT_FAIL), body


def _api_base(args: argparse.Namespace) -> str:
    return str(args.api or _client_addresses(args.config)["api"])


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def _when(ts: object) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S") if ts else ""  # type: ignore[arg-type]


def _cmd_replay(args: argparse.Namespace) -> int:
    try:
        base, token = _api_base(args), _token(args)
    except ConfigError as exc:
        print(f"passerelle replay: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    worst = EXIT_OK
    for mid in args.message_ids:
        code, body = _call_api("POST", base, f"/api/messages/{mid}/replay", token, as_json=args.json)
        if code == EXIT_OK and not args.json:
            print(f"{mid}: replayed (now {body.get('status', '')})")
        worst = max(worst, code)
    return worst


def _dlq_table(messages: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not messages:
        print("No dead letters.")
        return
    table = Table(title=f"Dead letters: {len(messages)}", title_justify="left")
    for column in ("Received", "Channel", "Control id", "Type", "Error", "Message id"):
        table.add_column(column, overflow="fold")
    for m in messages:
        table.add_row(
            _when(m.get("received_at")),
            str(m.get("channel") or ""),
            str(m.get("control_id") or ""),
            str(m.get("message_type") or ""),
            str(m.get("error") or ""),
            str(m.get("id") or ""),
        )
    _console().print(table)


def _cmd_dlq(args: argparse.Namespace) -> int:
    try:
        base, token = _api_base(args), _token(args)
    except ConfigError as exc:
        print(f"passerelle dlq: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "list":
        query = f"?limit={args.limit}" + (f"&channel={args.channel}" if args.channel else "")
        code, body = _call_api("GET", base, f"/api/dlq{query}", token, as_json=args.json)
        if code == EXIT_OK and not args.json:
            _dlq_table(list(body.get("messages", ())))
        return code
    if not args.message_ids:
        print(f"passerelle dlq {args.action}: give at least one message id", file=sys.stderr)
        return EXIT_USAGE
    worst = EXIT_OK
    done = {"replay": "replayed", "discard": "discarded"}[args.action]
    for mid in args.message_ids:
        code, _ = _call_api("POST", base, f"/api/dlq/{mid}/{args.action}", token, as_json=args.json)
        if code == EXIT_OK and not args.json:
            print(f"{mid}: {done}")
        worst = max(worst, code)
    return worst


def _mapping_step(args: argparse.Namespace, command: str) -> FhirMapping | None:
    """The mapping step ``convert`` and ``coverage`` run: the options' mappings, time zone, namespace
    policy and strictness, with the namespaces of --config; None, said on stderr, when one is wrong."""
    from gateway.engine.steps import FhirMapping
    from gateway.mapping.rules import shipped_mappings

    settings: dict[str, Any] = {
        "directory": args.mappings or str(shipped_mappings()),
        "timezone": args.timezone,
        "missing_namespace": args.missing_namespace,
        "strict": args.strict,
    }
    try:
        if args.config:
            settings["namespaces"] = config_mod.load(args.config).settings.namespaces
        return FhirMapping(command, settings)
    except ConfigError as exc:
        print(f"passerelle {command}: mapping error: {exc}", file=sys.stderr)
        return None


def _cmd_convert(args: argparse.Namespace) -> int:
    """Print, for each message, the FHIR Bundle the configured mappings make, with what they left unread."""
    from gateway.core.envelope import HL7_V2, Envelope
    from gateway.engine.steps import StepContext
    from gateway.hl7.er7 import Message

    if args.to == "hl7v2":
        return _convert_to_hl7v2(args)
    step = _mapping_step(args, "convert")
    if step is None:
        return EXIT_USAGE
    try:
        files = _convert_files(args.files, hl7=True)
    except FileNotFoundError as exc:
        print(f"passerelle convert: no such file or directory: {exc}", file=sys.stderr)
        return EXIT_USAGE
    worst = EXIT_OK
    for path in _progress(files, "convert"):
        name = str(path)
        for index, raw in enumerate(split_messages(path.read_bytes()), 1):
            out: dict[str, Any] = {"file": name, "message": index}
            try:
                msg = Message.decode(raw, default_charset=args.default_charset)
                env = Envelope(
                    id="convert",
                    channel="convert",
                    source="file",
                    raw=raw,
                    content_type=HL7_V2,
                    sender="",
                    control_id=msg.control_id,
                    message_type=f"{msg.message_type}^{msg.trigger}",
                    partition_key="",
                    received_at=0.0,
                    trace_id="convert",
                    charset=msg.charset,
                )
                ctx = StepContext(env, msg, env.content_type)
                step(ctx)
            except MessageError as exc:
                out.update(error={"code": exc.hl7_error_code, "text": exc.message, "location": exc.location})
                worst = EXIT_FAIL
            else:
                out.update(bundle=orjson.loads(ctx.payload()), unmapped=ctx.unmapped, warnings=ctx.warnings)
            print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return worst


def _convert_files(targets: Sequence[str], *, hl7: bool) -> list[Path]:
    """Files named, and in directories (recursively) the HL7v2 files, or the *.json ones."""
    from gateway.mapping.coverage import message_files, named_files

    if hl7:
        return message_files(targets)
    return named_files(targets, lambda p: p.name.endswith(".json"))


def _progress(files: Sequence[Path], what: str) -> Iterator[Path]:
    """The files, one by one, with a progress bar on a terminal's stderr (stdout stays the output)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=len(files) < 2 or not sys.stderr.isatty(),
    )
    with bar:
        yield from bar.track(files, description=what)


def _convert_to_hl7v2(args: argparse.Namespace) -> int:
    """Print the HL7v2 messages the reverse mappings make of FHIR files (the gateway's own step)."""
    import time

    from gateway.core.envelope import FHIR_JSON, Envelope
    from gateway.core.ids import new_id
    from gateway.engine.steps import Hl7v2Mapping, StepContext
    from gateway.mapping.rules import shipped_mappings

    settings = {
        "directory": args.mappings or str(shipped_mappings("reverse")),
        "timezone": args.timezone,
        "charset": args.charset,
    }
    try:
        step = Hl7v2Mapping("convert", settings)
    except ConfigError as exc:
        print(f"passerelle convert: mapping error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = _convert_files(args.files, hl7=False)
    except FileNotFoundError as exc:
        print(f"passerelle convert: no such file or directory: {exc}", file=sys.stderr)
        return EXIT_USAGE
    worst = EXIT_OK
    for path in _progress(files, "convert"):
        name = str(path)
        raw = path.read_bytes()
        env = Envelope(
            id=new_id(),
            channel="convert",
            source="file",
            raw=raw,
            content_type=FHIR_JSON,
            sender="",
            control_id="",
            message_type=f"{'PUT' if args.update else 'POST'} file",
            partition_key="",
            received_at=time.time(),
            trace_id="convert",
        )
        ctx = StepContext(env, None, FHIR_JSON, body=raw)
        try:
            step(ctx)
        except MessageError as exc:
            print(f"passerelle convert: {name}: {exc.message}", file=sys.stderr)
            worst = EXIT_FAIL
            continue
        for warning in ctx.warnings:
            print(f"passerelle convert: {name}: warning: {warning}", file=sys.stderr)
        # One segment per line, a blank line between messages: readable, and `send` takes it back.
        text = ctx.payload().decode(step.codec)
        sys.stdout.write(text.replace("\rMSH", "\r\nMSH").replace("\r", "\n"))
        sys.stdout.flush()
    return worst


def _cmd_coverage(args: argparse.Namespace) -> int:
    """Per message type: messages mapped or refused, the share of content that reached FHIR, and the
    unmapped paths most messages carry (gateway.mapping.coverage). The mapping step is ``convert``'s."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from gateway.mapping import coverage

    if args.top < 0:
        print("passerelle coverage: --top takes a number of paths, 0 or more", file=sys.stderr)
        return EXIT_USAGE
    try:
        ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        print(f"passerelle coverage: no such time zone: {args.timezone}", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = coverage.message_files(args.files)
    except FileNotFoundError as exc:
        print(f"passerelle coverage: no such file or directory: {exc}", file=sys.stderr)
        return EXIT_USAGE
    step = _mapping_step(args, "coverage")
    if step is None:
        return EXIT_USAGE
    try:
        report = coverage.measure_files(files, step.convert, default_charset=args.default_charset)
    except OSError as exc:
        print(f"passerelle coverage: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    if args.html:
        try:
            Path(args.html).write_text(report.html(args.top), "utf-8")
        except OSError as exc:
            print(f"passerelle coverage: cannot write {args.html}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
    if args.json:
        print(orjson.dumps(report.as_json(args.top), option=orjson.OPT_INDENT_2).decode())
    else:
        sys.stdout.write(report.text(args.top))
    return EXIT_OK


def _token_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token", help="bearer token (default: $PASSERELLE_TOKEN, else DATA_DIR/admin-token)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="where to find admin-token (default: the data_dir of --config, else ./var;"
        " the config's auth.admin_token_file comes first)",
    )


def _cmd_tail(args: argparse.Namespace) -> int:
    from gateway.logtail import run_tail

    return run_tail(args)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.store.audit import verify

    path = args.file or args.data_dir / "audit.db"
    result = verify(path)
    if result.ok:
        print(f"audit log intact: {result.entries} entries; head {result.head}")
        return EXIT_OK
    where = f"entry {result.bad_seq}: " if result.bad_seq is not None else ""
    print(f"audit log BROKEN at {where}{result.reason} ({result.entries} entries verified before it)")
    return EXIT_FAIL


def _cmd_import(args: argparse.Namespace) -> int:
    from gateway import transfer

    try:
        cfg = config_mod.load(args.config)
        report = asyncio.run(
            transfer.run_import(cfg, args.data_dir, args.store, args.paths, replace=args.replace)
        )
    except ConfigError as exc:
        print(f"passerelle import: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, OSError) as exc:
        print(f"passerelle import: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return EXIT_FAIL
    for line in report.bad_lines:
        print(f"bad line: {line}", file=sys.stderr)
    for line in report.conflicts:
        print(f"conflict: {line}", file=sys.stderr)
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_FAIL


def _epoch(text: str | None) -> float | None:
    from datetime import datetime

    if not text:
        return None
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} needs a UTC offset (Z or +hh:mm)")
    return moment.timestamp()


def _cmd_archive(args: argparse.Namespace) -> int:
    from gateway import transfer

    try:
        cfg = config_mod.load(args.config)
        if args.archive_command == "audit":
            path = args.file or transfer.data_dir_of(cfg, args.data_dir) / "audit.db"
            with Path(args.out).open("wb") as out:
                count, broken = transfer.export_audit(path, out)
            print(f"{count} audit entries written to {args.out}")
            if broken is not None:
                print(f"audit chain BROKEN at {broken} (entries written as stored)", file=sys.stderr)
                return EXIT_FAIL
            return EXIT_OK
        filters = {
            "since": _epoch(args.since),
            "until": _epoch(args.until),
            "channel": args.channel,
            "status": args.status,
            "payloads": args.payloads,
        }
        with Path(args.out).open("wb") as out:
            count = asyncio.run(transfer.run_message_export(cfg, args.data_dir, args.store, out, **filters))
    except ConfigError as exc:
        print(f"passerelle archive: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"passerelle archive: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StoreError, OSError) as exc:
        print(f"passerelle archive: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return EXIT_FAIL
    print(f"{count} messages written to {args.out}")
    return EXIT_OK


def _add_transfer_parsers(sub: Any) -> None:
    """``import`` and ``archive``: records in and out (gateway.transfer, docs/exit.md)."""
    imp = sub.add_parser(
        "import",
        help="load FHIR NDJSON (a bulk export's files) into this gateway's repository, ids and versions kept",
        description="Reads each NDJSON line as a resource and writes it as it is (id, meta.versionId,"
        " meta.lastUpdated) to the configured backend. Bad lines and conflicts are reported with"
        " their file and line; the exit status is then 1.",
    )
    imp.add_argument("paths", nargs="+", type=Path, help="NDJSON files, or directories of *.ndjson files")
    imp.add_argument("--config", default="config.yaml", help="the gateway's config (backend, data_dir)")
    imp.add_argument("--data-dir", type=Path, default=None, help="data directory (default: config's)")
    imp.add_argument("--store", default=None, help="postgresql://HOST:PORT/DB instead of config's store")
    imp.add_argument(
        "--replace",
        action="store_true",
        help="overwrite a resource stored already with other content (default: report it as a conflict)",
    )
    imp.set_defaults(func=_cmd_import)

    archive = sub.add_parser("archive", help="write the message journal or the audit trail as NDJSON")
    archive_sub = archive.add_subparsers(dest="archive_command", required=True)
    messages = archive_sub.add_parser(
        "export",
        help="the journal's messages with their trace (stages, deliveries), newest first",
        description="One JSON line per message. Payloads hold patient data: they are left out"
        " unless --payloads is given.",
    )
    audit = archive_sub.add_parser(
        "audit",
        help="the audit trail's entries with their hash chain (checked; exit 1 when broken)",
    )
    for parser in (messages, audit):
        parser.add_argument("--out", required=True, help="the NDJSON file to write")
        parser.add_argument("--config", default="config.yaml", help="the gateway's configuration")
        parser.add_argument("--data-dir", type=Path, default=None, help="data directory (default: config's)")
        parser.set_defaults(func=_cmd_archive)
    messages.add_argument("--store", default=None, help="postgresql://HOST:PORT/DB instead of config's store")
    messages.add_argument("--since", help="received at or after this instant (ISO 8601 with offset)")
    messages.add_argument("--until", help="received before this instant (ISO 8601 with offset)")
    messages.add_argument("--channel", help="only this channel's messages")
    messages.add_argument("--status", help="only messages in this status (RECEIVED, SENT, ERROR, DEAD...)")
    messages.add_argument(
        "--payloads",
        action="store_true",
        help="include the received bytes and each stage's output (base64): patient data",
    )
    audit.add_argument("--file", type=Path, default=None, help="the audit log (default: DATA_DIR/audit.db)")


def _cmd_validate(args: argparse.Namespace) -> int:
    from conformance import cli as conformance_cli

    return conformance_cli.validate(args.files, args.profile, args.profiles)


def _cmd_conformance(args: argparse.Namespace) -> int:
    from conformance import cli as conformance_cli

    if args.action == "list":
        return conformance_cli.list_suites()
    if not args.suite:
        print("passerelle conformance run: name the suite (passerelle conformance list)", file=sys.stderr)
        return EXIT_USAGE
    return conformance_cli.run(
        args.suite,
        args.target,
        listen=args.listen,
        report_dir=args.report_dir,
        token=args.token,
        profile=args.profile,
        count=args.count,
        fhir=args.fhir,
        api=args.api,
        settle=args.settle,
        timeout=args.timeout,
        reveal=args.reveal,
    )


def _port(text: str) -> int:
    """A TCP port for argparse: 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from exc
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: 0 to 65535")
    return value


def _directory(text: str) -> Path:
    """A data directory for argparse: a directory, or a path where one can be made."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="passerelle", description="HL7v2 / FHIR interoperability gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    here = _help_addresses()

    run = sub.add_parser("run", help="start the gateway (JSON logs on stdout; SIGTERM drains and exits 0)")
    run.add_argument("--config", default="config.yaml", help="the configuration file (default: config.yaml)")
    run.add_argument(
        "--data-dir",
        type=_directory,
        default=None,
        help="journal, repository, audit trail and admin-token go there (default: the config's data_dir)",
    )
    run.add_argument(
        "--mllp-port",
        type=_port,
        default=None,
        help="port of the first MLLP source, in place of its sources[].port (0: any free port)",
    )
    run.add_argument(
        "--http-port",
        type=_port,
        default=None,
        help="port of the HTTP API and console, in place of http.port",
    )
    run.add_argument("--journal", default=None, help="nats://HOST:PORT: the shared JetStream journal")
    run.add_argument("--store", default=None, help="postgresql://HOST:PORT/DB: the shared message store")
    run.set_defaults(func=_cmd_run)

    config_help = (
        "the gateway's config.yaml, read for the addresses and data_dir not given"
        " (default: ./config.yaml when there is one)"
    )
    send = sub.add_parser("send", help="send HL7v2 files over MLLP and print each ACK")
    send.add_argument("files", nargs="+", help="HL7v2 files (one or more messages each)")
    send.add_argument(
        "--to",
        default=None,
        help="mllp://HOST:PORT, or mllps://HOST:PORT for MLLP over TLS (default: the first MLLP source"
        f" of --config; here {here['mllp']})",
    )
    send.add_argument("--config", default=None, help=config_help)
    send.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each ACK (default: 30)"
    )
    send.add_argument("--json", action="store_true", help="one JSON line per message (file, code, ACK)")
    send.add_argument("--tls-ca", help="mllps: PEM of the authorities to trust (default: the system's)")
    send.add_argument("--tls-cert", help="mllps: client certificate (PEM), for a server that asks (mTLS)")
    send.add_argument("--tls-key", help="mllps: the client certificate's private key (PEM)")
    send.set_defaults(func=_cmd_send)

    convert = sub.add_parser("convert", help="print the FHIR the mappings make of HL7v2 files (no service)")
    convert.add_argument(
        "files",
        nargs="+",
        metavar="FILE|DIR",
        help="HL7v2 files (FHIR JSON with --to hl7v2); directories recursively",
    )
    convert.add_argument("--to", choices=["fhir", "hl7v2"], default="fhir", help="hl7v2: FHIR JSON files in")
    convert.add_argument(
        "--mappings", default=None, help="mapping directory (default: the shipped ones, or their reverse/)"
    )
    convert.add_argument("--charset", default="UNICODE UTF-8", help="--to hl7v2: MSH-18 of the output")
    convert.add_argument("--update", action="store_true", help="--to hl7v2: the resources are updates (A31)")
    convert.add_argument("--default-charset", default="8859/15", help="charset when MSH-18 is empty")
    convert.add_argument("--timezone", default="Europe/Paris", help="zone of HL7 times sent without one")
    convert.add_argument(
        "--config", help="a config.yaml whose `namespaces` table names the identifier systems (default: none)"
    )
    convert.add_argument(
        "--missing-namespace",
        choices=["reject", "sender"],
        default="sender",
        help="an identifier whose namespace is not known: refuse the message, or namespace it by its sender "
        "(default, with a warning)",
    )
    convert.add_argument(
        "--strict",
        action="store_true",
        help="refuse a message with a code not known or a required value missing",
    )
    convert.set_defaults(func=_cmd_convert)

    coverage = sub.add_parser(
        "coverage",
        help="per message type, the share of HL7v2 content the mappings carry into FHIR (no service)",
    )
    coverage.add_argument("files", nargs="+", metavar="FILE|DIR", help="HL7v2 files; directories recursively")
    coverage.add_argument("--json", action="store_true", help="print JSON instead of the table")
    coverage.add_argument("--html", metavar="OUT.html", help="also write a self-contained HTML report")
    coverage.add_argument("--top", type=int, default=20, help="unmapped paths listed per type (default: 20)")
    coverage.add_argument("--mappings", default=None, help="mapping directory (default: the shipped ones)")
    coverage.add_argument(
        "--config", help="a config.yaml whose `namespaces` table names the identifier systems (default: none)"
    )
    coverage.add_argument("--default-charset", default="8859/15", help="charset when MSH-18 is empty")
    coverage.add_argument("--timezone", default="Europe/Paris", help="zone of HL7 times sent without one")
    coverage.add_argument(
        "--missing-namespace",
        choices=["reject", "sender"],
        default="sender",
        help="an identifier whose namespace is not known: refuse the message, or namespace it by its sender "
        "(default)",
    )
    coverage.add_argument(
        "--strict",
        action="store_true",
        help="refuse a message with a code not known or a required value missing",
    )
    coverage.set_defaults(func=_cmd_coverage)

    api_help = (
        "base URL of the running gateway's HTTP API (default: http.host and http.port of --config;"
        f" here {here['api']})"
    )
    json_help = "print the API's JSON answers, for scripts (default: readable lines and tables)"
    replay = sub.add_parser("replay", help="process stored messages again")
    replay.add_argument("message_ids", nargs="+", help="ids of stored messages (as the console and dlq list)")
    replay.add_argument("--api", default=None, help=api_help)
    replay.add_argument("--config", default=None, help=config_help)
    replay.add_argument("--json", action="store_true", help=json_help)
    _token_args(replay)
    replay.set_defaults(func=_cmd_replay)

    dlq = sub.add_parser("dlq", help="list, replay or discard dead messages")
    dlq.add_argument(
        "action", choices=["list", "replay", "discard"], help="list them, or replay or discard the ids given"
    )
    dlq.add_argument("message_ids", nargs="*", help="ids of dead messages (replay, discard)")
    dlq.add_argument("--channel", help="list: only this channel's dead messages")
    dlq.add_argument("--limit", type=int, default=100, help="list: at most this many (default: 100)")
    dlq.add_argument("--api", default=None, help=api_help)
    dlq.add_argument("--config", default=None, help=config_help)
    dlq.add_argument("--json", action="store_true", help=json_help)
    _token_args(dlq)

    tail = sub.add_parser("tail", help="follow a JSON log stream (a file, or stdin) with filters")
    tail.add_argument("file", nargs="?", default="-", help="a log file, or - for stdin (default)")
    tail.add_argument("--channel", help="only the lines about this channel")
    tail.add_argument(
        "--level",
        choices=["debug", "info", "warning", "error", "critical"],
        help="only lines at this level or above",
    )
    tail.add_argument("--message-id", help="only the lines about this message")
    tail.add_argument("--since", help="an ISO time, or a duration back from now: 30s, 15m, 2h, 1d")
    tail.add_argument("--no-follow", action="store_true", help="print what is there and stop")
    tail.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="colour the levels: on a terminal only (auto, the default), always or never",
    )
    tail.set_defaults(func=_cmd_tail)

    audit = sub.add_parser("audit", help="the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check the hash chain; exits non-zero at the first bad entry"
    )
    verify.add_argument(
        "--data-dir", type=Path, default=Path("./var"), help="where the audit log is (default: ./var)"
    )
    verify.add_argument("--file", type=Path, default=None, help="the audit log (default: DATA_DIR/audit.db)")
    verify.set_defaults(func=_cmd_audit_verify)
    dlq.set_defaults(func=_cmd_dlq)

    validate = sub.add_parser("validate", help="check HL7v2 (PAM FR) or FHIR JSON files; non-zero on error")
    validate.add_argument("files", nargs="+", help="HL7v2 (.hl7, ER7) or FHIR JSON files")
    validate.add_argument("--profile", help="FHIR profile (id, name or url) instead of meta.profile")
    validate.add_argument("--profiles", help="StructureDefinition directory (default: profiles/)")
    validate.set_defaults(func=_cmd_validate)

    conformance = sub.add_parser("conformance", help="list or run conformance suites")
    conformance.add_argument("action", choices=["list", "run"], help="list the suites, or run one")
    conformance.add_argument("suite", nargs="?", help="suite name or path to a suite YAML file")
    conformance.add_argument("--target", help="mllp://HOST:PORT, http(s)://HOST/fhir, or a file or directory")
    conformance.add_argument("--listen", help="mllp://HOST:PORT to receive on (live sender suites)")
    conformance.add_argument("--report-dir", help="write NAME.json, NAME.junit.xml and NAME.html there")
    conformance.add_argument("--token", help="bearer token for HTTP targets, --fhir and --api")
    conformance.add_argument("--fhir", help="http(s)://HOST/fhir: the receiver's FHIR API, for result checks")
    conformance.add_argument("--api", help="http(s)://HOST:PORT/api: a Passerelle gateway's admin API")
    conformance.add_argument(
        "--settle",
        type=float,
        help="seconds given to asynchronous processing per case (default: the suite's)",
    )
    conformance.add_argument("--profile", help="FHIR profile for the files suite")
    conformance.add_argument("--count", type=int, help="messages to wait for (live sender suites)")
    conformance.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="seconds each answer (ACK, HTTP response) is waited for (default: suite timeout_s, else 30)",
    )
    conformance.add_argument(
        "--reveal",
        action="store_true",
        help="write the messages and answers unmasked in the reports (they may then hold patient data)",
    )
    conformance.set_defaults(func=_cmd_conformance)
    _add_transfer_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
