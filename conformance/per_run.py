"""Identifiers made unique for each run of a live receiver suite: the one place messages are rewritten.

A receiver keeps what earlier runs sent: the same IPP sent again is the same patient to it, the
same MSH-10 a duplicate. So every message a run sends gets its own MSH-10 and MSH-7, and the
fields the suite lists under ``per_run:`` get this run's values: component 1 of each repetition
(of the identifier type named, if one is), in every occurrence of the segment. Two ways:

- ``suffix`` (the default): the run's six digits appended (``300030`` → ``300030`` + ``482913``);
- ``nir``: another valid NIR, for INS values (a second IPP carrying the same INS would be a
  collision to an identity server): the first seven digits kept (sex, birth year and month,
  department), the next six shifted by the run's number, the two-digit key computed again.

The same authored value always gives the same run value within a run. Checks name an authored
value as ``{run:VALUE}``; it stands for what this run sent instead.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from conformance.errors import SuiteError
from gateway.hl7.er7 import Message

RUN_VALUE: Final = re.compile(r"\{run:([^{}]*)\}")
METHODS: Final = ("suffix", "nir")
_FIELD: Final = re.compile(r"([A-Z][A-Z0-9]{2})-([1-9][0-9]*)")
_NIR: Final = re.compile(r"[0-9]{15}")
_RULE_KEYS: Final = frozenset({"field", "type", "as"})


@dataclass(frozen=True, slots=True)
class RewriteRule:
    segment: str
    field: int
    type: str | None  # CX-5 of the repetitions rewritten; None: every repetition
    method: str  # one of METHODS

    @property
    def label(self) -> str:
        return f"{self.segment}-{self.field}" + (f" ({self.type})" if self.type else "")


def parse_rules(raw: Any, key: str = "per_run") -> list[RewriteRule]:
    """The ``per_run:`` list of a suite; SuiteError names the key at fault."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SuiteError(f"key {key!r}: a list of {{field: SEG-N, type: CODE, as: suffix|nir}}")
    rules: list[RewriteRule] = []
    for index, item in enumerate(raw):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise SuiteError(f"key {where!r}: a mapping such as {{field: PID-3, type: PI}}")
        unknown = sorted(set(item) - _RULE_KEYS)
        if unknown:
            raise SuiteError(f"key '{where}.{unknown[0]}': unknown (known: as, field, type)")
        field = item.get("field")
        match = _FIELD.fullmatch(field) if isinstance(field, str) else None
        if match is None or match.group(1) == "MSH":
            raise SuiteError(
                f"key '{where}.field': a field such as PID-3 (MSH-10 and MSH-7 are always made unique)"
            )
        kind = item.get("type")
        if kind is not None and (not isinstance(kind, str) or not kind):
            raise SuiteError(f"key '{where}.type': an identifier type code (CX-5), such as PI")
        method = item.get("as", "suffix")
        if method not in METHODS:
            raise SuiteError(f"key '{where}.as': {method!r} is not one of {', '.join(METHODS)}")
        rules.append(RewriteRule(match.group(1), int(match.group(2)), kind, method))
    return rules


def targets(msg: Message, rules: Sequence[RewriteRule]) -> Iterator[tuple[str, str, RewriteRule]]:
    """(path of component 1, its value, the rule) for each non-empty value the rules rewrite."""
    for rule in rules:
        for occurrence in range(1, len(msg.segments_named(rule.segment)) + 1):
            field = f"{rule.segment}[{occurrence}]-{rule.field}"
            for rep in range(1, len(msg.repetitions(field)) + 1):
                base = f"{field}[{rep}]"
                if rule.type is not None and msg.get(f"{base}.5") != rule.type:
                    continue
                value = msg.get(f"{base}.1")
                if value:
                    yield f"{base}.1", value, rule


def check_value(value: str, rule: RewriteRule) -> None:
    """A value the rule cannot rewrite: SuiteError (said at load time, with the step's key)."""
    if rule.method == "nir" and _NIR.fullmatch(value) is None:
        raise SuiteError(f"{rule.label} holds a value that is not a NIR (13 digits and the 2-digit key)")


def other_nir(nir: str, shift: int) -> str:
    """A NIR with the same first seven digits, the next six shifted by ``shift``, and its key."""
    body = nir[:7] + f"{(int(nir[7:13]) + shift) % 1_000_000:06d}"
    return body + f"{97 - int(body) % 97:02d}"


class PerRun:
    """One run's identity: its control ids, and the values it sends for the authored ones."""

    def __init__(self, rules: Sequence[RewriteRule], run_id: str | None = None) -> None:
        self.rules = list(rules)
        self.run_id = run_id or uuid.uuid4().hex[:8].upper()
        self.number = int(self.run_id, 16) % 1_000_000
        self.values: dict[str, str] = {}  # authored → sent in this run
        self._serial = 0

    @property
    def digits(self) -> str:
        return f"{self.number:06d}"

    def value(self, authored: str, rule: RewriteRule) -> str:
        sent = self.values.get(authored)
        if sent is None:
            check_value(authored, rule)
            sent = other_nir(authored, self.number) if rule.method == "nir" else authored + self.digits
            self.values[authored] = sent
        return sent

    def prepare(self, raw: bytes) -> tuple[bytes, str]:
        """The message as this run sends it, and its MSH-10."""
        msg = Message.decode(raw, default_charset="UNICODE UTF-8")
        self._serial += 1
        control_id = f"CF{self.run_id}{self._serial:04d}"
        msg.set("MSH-10", control_id)
        msg.set("MSH-7", time.strftime("%Y%m%d%H%M%S"))
        for path, value, rule in list(targets(msg, self.rules)):
            msg.set(path, self.value(value, rule))
        return msg.encode(), control_id

    def expand(self, text: str) -> str:
        """``text`` with each ``{run:VALUE}`` replaced by what this run sent for VALUE."""

        def sent(match: re.Match[str]) -> str:
            authored = match.group(1)
            if authored not in self.values:
                raise SuiteError(f"{{run:{authored}}}: no message of this run carried {authored!r}")
            return self.values[authored]

        return RUN_VALUE.sub(sent, text)


def placeholders(text: str) -> list[str]:
    return RUN_VALUE.findall(text)
