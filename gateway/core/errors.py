"""The one error tree of Passerelle.

Every error knows how it is answered on each wire, so a boundary never has to
guess: ``ack_code`` (MSA-1), ``hl7_error_code`` (ERR-3, HL7 table 0357),
``http_status`` and ``fhir_issue_code`` (OperationOutcome.issue.code).
Library errors are translated once per boundary with ``raise ... from exc``.

    PasserelleError
    ├── ConfigError                  start-up: names the file, the key, the line
    ├── MessageError                 an inbound message we must answer AE/AR
    │   ├── FrameError               MLLP framing (AR)
    │   │   └── FrameTooLarge        frame over the configured limit (AR, then close)
    │   ├── ParseError               malformed ER7 (AR)
    │   ├── EncodingError            unknown charset / undecodable bytes (AR)
    │   ├── UnsupportedMessage       type or trigger this channel does not take (AR)
    │   ├── SenderNotAllowed         the sender identity may not feed this channel (AR)
    │   ├── ValidationError          content breaks a rule (AE)
    │   │   └── UnknownNamespace     an identifier whose namespace cannot be resolved (AE, 103)
    │   └── ProcessingError          a step failed on a valid message (AE)
    ├── DeliveryError                a destination did not take the message
    │   ├── RetryLater               transient: try again after ``defer`` seconds
    │   └── PermanentDeliveryError   no retry will help
    ├── StoreError                   journal or store failure (AE / 503)
    └── HttpError                    a request answered with 4xx/5xx
        ├── BadRequest (400) · Unauthorized (401) · Forbidden (403)
        ├── NotFound (404) · MethodNotAllowed (405) · Conflict (409)
        ├── PayloadTooLarge (413) · UnsupportedMediaType (415)
        ├── Unprocessable (422)
        └── TooManyRequests (429)
"""

from __future__ import annotations

from enum import StrEnum


class AckCode(StrEnum):
    """MSA-1 values (HL7 table 0008)."""

    AA = "AA"
    AE = "AE"
    AR = "AR"
    CA = "CA"
    CE = "CE"
    CR = "CR"


class Severity(StrEnum):
    """ERR-4 values (HL7 table 0516)."""

    ERROR = "E"
    WARNING = "W"
    INFO = "I"


class PasserelleError(Exception):
    """Root of every error the gateway raises on purpose."""

    ack_code: AckCode = AckCode.AE
    hl7_error_code: str = "207"  # table 0357: application internal error
    http_status: int = 500
    fhir_issue_code: str = "exception"

    def __init__(self, message: str, *, location: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # HL7 location such as "PID-3[2].4" or a FHIRPath expression.
        self.location = location


class ConfigError(PasserelleError):
    """A configuration problem found at start-up; the process exits non-zero."""

    def __init__(
        self, reason: str, *, file: str | None = None, key: str | None = None, line: int | None = None
    ) -> None:
        self.file = file
        self.key = key
        self.line = line
        self.reason = reason
        where = file or "<config>"
        if line is not None:
            where += f":{line}"
        text = f"{where}: {key}: {reason}" if key else f"{where}: {reason}"
        super().__init__(text)


class MessageError(PasserelleError):
    """An inbound message that is answered with AE or AR."""


class FrameError(MessageError):
    ack_code = AckCode.AR
    hl7_error_code = "100"
    http_status = 400
    fhir_issue_code = "structure"


class FrameTooLarge(FrameError):
    http_status = 413
    fhir_issue_code = "too-long"


class ParseError(MessageError):
    ack_code = AckCode.AR
    hl7_error_code = "102"
    http_status = 400
    fhir_issue_code = "structure"


class MissingField(ParseError):
    hl7_error_code = "101"


class SegmentSequenceError(ParseError):
    """The segments are not where the message structure puts them: no MSH first (table 0357: 100)."""

    hl7_error_code = "100"


class EncodingError(MessageError):
    ack_code = AckCode.AR
    hl7_error_code = "102"
    http_status = 400
    fhir_issue_code = "invalid"


class UnsupportedMessage(MessageError):
    ack_code = AckCode.AR
    hl7_error_code = "200"
    http_status = 422
    fhir_issue_code = "not-supported"


class SenderNotAllowed(MessageError):
    """The connection's sender identity may not feed the channel(s) this message is for (AR)."""

    ack_code = AckCode.AR
    hl7_error_code = "207"
    http_status = 403
    fhir_issue_code = "forbidden"


class ValidationError(MessageError):
    ack_code = AckCode.AE
    hl7_error_code = "101"
    http_status = 422
    fhir_issue_code = "invalid"


class UnknownNamespace(ValidationError):
    """A business identifier whose assigning authority names no known namespace: it is never
    matched on its bare value (HL7 table 0357: 103, table value not found)."""

    hl7_error_code = "103"


class ProcessingError(MessageError):
    ack_code = AckCode.AE
    hl7_error_code = "207"
    http_status = 500
    fhir_issue_code = "processing"


class DeliveryError(PasserelleError):
    """A destination refused or could not take a message."""

    http_status = 502
    fhir_issue_code = "transient"


class RetryLater(DeliveryError):
    """Transient failure: the destination may succeed if tried again after ``defer`` s."""

    def __init__(self, message: str, *, defer: float | None = None) -> None:
        super().__init__(message)
        self.defer = defer


class PermanentDeliveryError(DeliveryError):
    """The destination will never accept this message as it is."""

    fhir_issue_code = "processing"


class StoreError(PasserelleError):
    """The journal or a store failed; the sender must retry."""

    http_status = 503
    fhir_issue_code = "transient"


class HttpError(PasserelleError):
    http_status = 400
    fhir_issue_code = "invalid"


class BadRequest(HttpError):
    http_status = 400


class Unauthorized(HttpError):
    http_status = 401
    fhir_issue_code = "login"


class Forbidden(HttpError):
    http_status = 403
    fhir_issue_code = "forbidden"


class NotFound(HttpError):
    http_status = 404
    fhir_issue_code = "not-found"


class MethodNotAllowed(HttpError):
    http_status = 405
    fhir_issue_code = "not-supported"


class Conflict(HttpError):
    http_status = 409
    fhir_issue_code = "conflict"


class PayloadTooLarge(HttpError):
    http_status = 413
    fhir_issue_code = "too-long"


class UnsupportedMediaType(HttpError):
    http_status = 415
    fhir_issue_code = "not-supported"


class Unprocessable(HttpError):
    http_status = 422
    fhir_issue_code = "processing"


class TooManyRequests(HttpError):
    """A client over its request rate; it may retry after ``retry_after`` seconds."""

    http_status = 429
    fhir_issue_code = "throttled"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
