"""The ``passerelle`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway.core import config as config_mod
from gateway.core.errors import ConfigError, MessageError
from gateway.core.logging import configure as configure_logging

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway

    try:
        cfg = config_mod.load(args.config)
        configure_logging(cfg.data.get("log_level", "info"))
        gateway = Gateway(cfg, data_dir=args.data_dir, mllp_port=args.mllp_port, http_port=args.http_port)
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
    return EXIT_OK


def split_messages(data: bytes) -> list[bytes]:
    """A file may hold several messages, one per MSH; line ends of any kind become \\r."""
    text = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    messages: list[bytes] = []
    for segment in text.split(b"\r"):
        if not segment.strip():
            continue
        if segment.startswith(b"MSH") or not messages:
            messages.append(segment + b"\r")
        else:
            messages[-1] += segment + b"\r"
    return messages


def _parse_mllp_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "mllp" or not parts.hostname or not parts.port:
        raise ValueError(f"expected mllp://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port


async def _send(files: Sequence[str], host: str, port: int, timeout: float) -> int:
    from connectors.mllp.client import MllpClient
    from gateway.hl7.ack import parse_ack

    client = MllpClient(host, port)
    worst = EXIT_OK
    try:
        for name in files:
            data = await asyncio.to_thread(Path(name).read_bytes)
            for raw in split_messages(data):
                try:
                    answer = await client.send(raw, timeout=timeout)
                except (TimeoutError, OSError, ConnectionError) as exc:
                    print(f"{name}: no answer: {type(exc).__name__} {exc}", file=sys.stderr)
                    return EXIT_FAIL
                print(answer.decode("latin-1").replace("\r", "\n").rstrip("\n"))
                print()
                try:
                    code = parse_ack(answer)[0]
                except MessageError:
                    code = ""
                if code not in ("AA", "CA"):
                    worst = EXIT_FAIL
    finally:
        await client.close()
    return worst


def _cmd_send(args: argparse.Namespace) -> int:
    try:
        host, port = _parse_mllp_url(args.to)
    except ValueError as exc:
        print(f"passerelle send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for name in args.files:
        if not Path(name).is_file():
            print(f"passerelle send: no such file: {name}", file=sys.stderr)
            return EXIT_USAGE
    return asyncio.run(_send(args.files, host, port, args.timeout))


async def _api(method: str, base: str, path: str) -> tuple[int, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.request(method, base.rstrip("/") + path) as resp:
        body = await resp.read()
        try:
            return resp.status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return resp.status, body.decode("utf-8", "replace")


def _call_api(method: str, base: str, path: str) -> int:
    try:
        status, body = asyncio.run(_api(method, base, path))
    except OSError as exc:
        print(f"passerelle: cannot reach the gateway at {base}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return EXIT_OK if status < 400 else EXIT_FAIL


def _cmd_replay(args: argparse.Namespace) -> int:
    worst = EXIT_OK
    for mid in args.message_ids:
        worst = max(worst, _call_api("POST", args.api, f"/api/messages/{mid}/replay"))
    return worst


def _cmd_dlq(args: argparse.Namespace) -> int:
    if args.action == "list":
        query = f"?limit={args.limit}" + (f"&channel={args.channel}" if args.channel else "")
        return _call_api("GET", args.api, f"/api/dlq{query}")
    if not args.message_ids:
        print(f"passerelle dlq {args.action}: give at least one message id", file=sys.stderr)
        return EXIT_USAGE
    worst = EXIT_OK
    for mid in args.message_ids:
        worst = max(worst, _call_api("POST", args.api, f"/api/dlq/{mid}/{args.action}"))
    return worst


def _cmd_convert(args: argparse.Namespace) -> int:
    """Print, for each message, the FHIR Bundle the configured mappings make, with what they left unread."""
    from gateway.core.envelope import HL7_V2, Envelope
    from gateway.engine.steps import FhirMapping, StepContext
    from gateway.hl7.er7 import Message

    try:
        step = FhirMapping("convert", {"directory": args.mappings, "timezone": args.timezone})
    except ConfigError as exc:
        print(f"passerelle convert: mapping error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    worst = EXIT_OK
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            print(f"passerelle convert: no such file: {name}", file=sys.stderr)
            return EXIT_USAGE
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="passerelle", description="HL7v2 / FHIR interoperability gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the gateway (JSON logs on stdout; SIGTERM drains and exits 0)")
    run.add_argument("--config", default="config.yaml")
    run.add_argument("--data-dir", type=Path, default=None)
    run.add_argument("--mllp-port", type=int, default=None)
    run.add_argument("--http-port", type=int, default=None)
    run.set_defaults(func=_cmd_run)

    send = sub.add_parser("send", help="send HL7v2 files over MLLP and print each ACK")
    send.add_argument("files", nargs="+")
    send.add_argument("--to", required=True, help="mllp://HOST:PORT")
    send.add_argument("--timeout", type=float, default=30.0)
    send.set_defaults(func=_cmd_send)

    convert = sub.add_parser("convert", help="print the FHIR the mappings make of HL7v2 files (no service)")
    convert.add_argument("files", nargs="+")
    convert.add_argument("--to", choices=["fhir"], default="fhir")
    convert.add_argument("--mappings", default="mappings", help="the mapping directory (default: ./mappings)")
    convert.add_argument("--default-charset", default="8859/15", help="charset when MSH-18 is empty")
    convert.add_argument("--timezone", default="Europe/Paris", help="zone of HL7 times sent without one")
    convert.set_defaults(func=_cmd_convert)

    api_help = "base URL of the running gateway's HTTP API"
    replay = sub.add_parser("replay", help="process stored messages again")
    replay.add_argument("message_ids", nargs="+")
    replay.add_argument("--api", default="http://127.0.0.1:8080", help=api_help)
    replay.set_defaults(func=_cmd_replay)

    dlq = sub.add_parser("dlq", help="list, replay or discard dead messages")
    dlq.add_argument("action", choices=["list", "replay", "discard"])
    dlq.add_argument("message_ids", nargs="*")
    dlq.add_argument("--channel")
    dlq.add_argument("--limit", type=int, default=100)
    dlq.add_argument("--api", default="http://127.0.0.1:8080", help=api_help)
    dlq.set_defaults(func=_cmd_dlq)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
