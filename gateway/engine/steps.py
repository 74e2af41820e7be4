"""Channel steps: plain callables run in a plain loop, as structlog runs processors.

A step reads and changes a StepContext. It may set ``filtered`` to stop the
message (a result, not an error) or raise a MessageError (the message goes ERROR).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson

from gateway.core.envelope import FHIR_JSON, HL7_V2, Envelope
from gateway.core.errors import MessageError, UnsupportedMessage, ValidationError
from gateway.hl7.charsets import CHARSETS, codec_for
from gateway.hl7.er7 import Message
from gateway.mapping import catalog, functions, namespaces, reverse_functions
from gateway.mapping.engine import Library, MappingResult
from gateway.mapping.reverse import ReverseLibrary
from gateway.mapping.validate import bundle_errors
from gateway.store.fhir_common import FhirRepository


@dataclass(slots=True)
class StepContext:
    envelope: Envelope
    message: Message | None  # the HL7v2 message, when the payload is HL7v2
    content_type: str
    body: bytes | None = None  # the payload when it is not HL7v2 (or replaced by a step)
    filtered: str | None = None  # reason, when a step declines the message
    changed: bool = False
    warnings: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # fields no mapping rule read
    # Resources read from the repository for this message ("Patient/123" → resource): those the
    # request names by id without holding them (see Hl7v2Mapping.prepare).
    resolved: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> bytes:
        if self.body is not None:
            return self.body
        if self.message is not None:
            return self.message.encode()
        return self.envelope.raw


class Step(Protocol):
    name: str

    def __call__(self, ctx: StepContext) -> None: ...


class PreparingStep(Step, Protocol):
    """A step that reads something before it runs (awaited by the channel, then the step is called)."""

    async def prepare(self, envelope: Envelope) -> dict[str, Any]: ...


class ScreeningStep(Step, Protocol):
    """A step that may refuse a message at intake, before it is acknowledged."""

    def screen(self, message: Message) -> MessageError | None: ...


class EditingStep(Step, Protocol):
    """A step that only edits the HL7v2 message: intake screening sees the message it makes."""

    def edit(self, message: Message) -> Message | None:
        """The message changed (in place or anew); None when this step leaves it as it is."""
        ...


StepFactory = Callable[[str, Mapping[str, Any]], Step]


class SetField:
    """Set one ER7 field, e.g. re-address MSH-5/MSH-6 for the receiving system."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["path", "value"],
        "properties": {
            "path": {"type": "string", "pattern": r"^[A-Z][A-Z0-9]{2}"},
            "value": {"type": "string"},
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.path: str = settings["path"]
        self.value: str = settings["value"]
        Message.parse("MSH|^~\\&|\r").get(self.path)  # a bad path fails at start-up, not per message

    def edit(self, message: Message) -> Message | None:
        if message.get(self.path) == self.value:
            return None
        message.set(self.path, self.value)
        return message

    def __call__(self, ctx: StepContext) -> None:
        _edit(self, ctx)


class RemoveSegments:
    """Drop segments a receiver does not take (say, Z segments for a system without PAM FR)."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["segments"],
        "properties": {
            "segments": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z][A-Z0-9]{2}$"}}
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.names = frozenset(settings["segments"]) - {"MSH"}

    def edit(self, message: Message) -> Message | None:
        if not any(seg.name in self.names for seg in message.segments):
            return None
        return message.without(self.names)

    def __call__(self, ctx: StepContext) -> None:
        _edit(self, ctx)


def _edit(step: EditingStep, ctx: StepContext) -> None:
    if ctx.message is None:
        return
    edited = step.edit(ctx.message)
    if edited is not None:
        ctx.message = edited
        ctx.changed = True


class FhirMapping:
    """HL7v2 → FHIR transaction Bundle through the declarative mappings; the Bundle is validated.

    Every non-empty leaf the message carried and no rule put into the Bundle is recorded as
    ``unmapped`` on the message (``unmapped: reject`` refuses such a message instead). Keys are
    namespaced (config.yaml ``namespaces``); an identifier whose namespace cannot be resolved is
    refused (``missing_namespace: reject``) or namespaced by its sender (``sender``). A code not
    known or a required element left empty degrades with a warning, or refuses the message when
    ``strict``. A type no mapping serves is answered AR (``unsupported: reject``) or kept in ERROR.
    """

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["directory"],
        "properties": {
            "directory": {"type": "string", "minLength": 1},
            "unmapped": {"enum": ["report", "reject"]},
            "timezone": {"type": "string", "minLength": 1},
            "fr_core_version": {"enum": list(functions.FR_CORE_VERSIONS)},
            "missing_namespace": {"enum": list(namespaces.POLICIES)},
            "strict": {"type": "boolean"},
            "unsupported": {"enum": ["reject", "error"]},
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.library = Library.load(Path(settings["directory"]), catalog.available())
        self.fr_core_version: str = settings.get("fr_core_version", "2.1.0")
        self.reject_unmapped = settings.get("unmapped", "report") == "reject"
        self.timezone: str = settings.get("timezone", "Europe/Paris")
        ZoneInfo(self.timezone)  # an unknown zone fails at start-up
        self.namespaces = namespaces.Namespaces.from_config(
            settings.get("namespaces"), settings.get("missing_namespace", "reject")
        )
        self.strict = bool(settings.get("strict", False))
        self.reject_unsupported = settings.get("unsupported", "reject") == "reject"

    def convert(self, message: Message) -> MappingResult:
        """The message mapped and checked: its Bundle, warnings and unmapped leaves. Raises the
        MessageError the channel answers with (a type not mapped, a namespace not known, an
        invalid Bundle, a degradation on a strict channel, content not mapped with ``reject``)."""
        result = self.library.map(
            message, timezone=self.timezone, fr_core_version=self.fr_core_version, namespaces=self.namespaces
        )
        if self.strict and result.degraded:
            raise ValidationError(f"strict channel: {result.degraded[0]}")
        if result.unmapped and self.reject_unmapped:
            raise ValidationError(
                f"content no mapping reads: {', '.join(result.unmapped[:10])}", location=result.unmapped[0]
            )
        errors = bundle_errors(result.bundle)
        if errors:
            raise ValidationError("the FHIR produced is not valid: " + "; ".join(errors[:5]))
        return result

    def screen(self, message: Message) -> MessageError | None:
        """What the channel refuses before acknowledging: a type no mapping serves (with
        ``unsupported: reject``) and, when the channel asks to refuse rather than degrade
        (``missing_namespace: reject``, ``strict``, ``unmapped: reject``), whatever the mapping
        itself would refuse."""
        event = f"{message.message_type}^{message.trigger}"
        why = self.library.why_unsupported(event)
        if why is not None:
            return UnsupportedMessage(why, location="MSH-9") if self.reject_unsupported else None
        if self.namespaces.policy == "reject" or self.strict or self.reject_unmapped:
            try:
                self.convert(message)
            except MessageError as exc:
                return exc
        return None

    def __call__(self, ctx: StepContext) -> None:
        if ctx.message is None:
            return
        result = self.convert(ctx.message)
        ctx.warnings.extend(result.warnings)
        ctx.unmapped = result.unmapped
        ctx.body = orjson.dumps(result.bundle)
        ctx.content_type = FHIR_JSON
        ctx.changed = True


class Hl7v2Mapping:
    """FHIR (a resource or a transaction/batch Bundle) → HL7v2 through the reverse mappings.

    The messages are built with the ER7 codec in the step's ``charset`` (MSH-18). A request that
    makes several messages (two Encounters, say) gives them in order, each ended by its CR; the
    MLLP destination sends them one by one. MSH-7 and MSH-10 derive from the envelope, so a
    replay produces the same messages (a receiver that dedupes on MSH-10 sees a resend).
    """

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["directory"],
        "properties": {
            "directory": {"type": "string", "minLength": 1},
            "timezone": {"type": "string", "minLength": 1},
            "charset": {"enum": sorted(CHARSETS)},
            "sending_application": {"type": "string"},
            "sending_facility": {"type": "string"},
            "receiving_application": {"type": "string"},
            "receiving_facility": {"type": "string"},
            "processing_id": {"enum": ["P", "T", "D"]},
            "unmapped": {"enum": ["report", "reject"]},
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.library = ReverseLibrary.load(Path(settings["directory"]), reverse_functions.available())
        self.timezone: str = settings.get("timezone", "Europe/Paris")
        ZoneInfo(self.timezone)  # an unknown zone fails at start-up
        keys = ("sending_application", "sending_facility", "receiving_application", "receiving_facility")
        self.header = {k: str(settings[k]) for k in keys if k in settings}
        self.header["charset"] = settings.get("charset", "UNICODE UTF-8")
        self.codec = codec_for(self.header["charset"])
        self.header["processing_id"] = settings.get("processing_id", "P")
        self.reject_unmapped = settings.get("unmapped", "report") == "reject"
        # The runtime's FHIR repository, read-only here (set by the runtime; None: not looked up).
        self.repository: FhirRepository | None = None

    async def prepare(self, envelope: Envelope) -> dict[str, Any]:
        """Read the Patients the request names by id only (``Patient/123``) from the repository.

        Raises StoreError when the repository cannot be read (the message is then kept in ERROR,
        to be replayed). What is not found stays absent: the mapping then says so.
        """
        if self.repository is None or envelope.content_type != FHIR_JSON:
            return {}
        try:
            data = orjson.loads(envelope.raw)
        except orjson.JSONDecodeError:
            return {}  # __call__ reports it
        if not isinstance(data, dict):
            return {}
        found: dict[str, Any] = {}
        for type_, id_ in self.library.wanted(data):
            resource = await self.repository.read(type_, id_)
            if resource is not None:
                found[f"{type_}/{id_}"] = resource
        return found

    def __call__(self, ctx: StepContext) -> None:
        if ctx.content_type != FHIR_JSON:
            return
        try:
            data = orjson.loads(ctx.payload())
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"not JSON: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise ValidationError("a FHIR resource or Bundle is a JSON object")
        env = ctx.envelope
        interaction = "update" if env.message_type.startswith(("PUT ", "PATCH ")) else "create"
        result = self.library.map(
            data,
            interaction=interaction,
            header=self.header,
            control_id=env.id[-20:],
            now=datetime.fromtimestamp(env.received_at, UTC),
            timezone=self.timezone,
            known=ctx.resolved if self.repository is not None else None,
        )
        ctx.warnings.extend(result.warnings)
        ctx.unmapped = result.unmapped
        if result.unmapped and self.reject_unmapped:
            raise ValidationError(
                f"content no reverse rule reads: {', '.join(result.unmapped[:10])}",
                location=result.unmapped[0],
            )
        ctx.body = b"".join(msg.encode() for msg in result.messages)
        ctx.message = result.messages[0]
        ctx.content_type = HL7_V2
        ctx.changed = True
