"""Result checks of live receiver suites: what the system did with the messages, not only its ACKs.

A case may end with ``then:``, a list of FHIR searches against the system's FHIR API (``--fhir``)
with what the matches must show::

    then:
      - search: Patient?identifier=urn:oid:1.2.250.1.71.4.2.2.1234|{run:300030}
        title: the survivor, once, with the new INS
        where: active.exists().not() or active      # FHIRPath: only these matches are counted
        count: 1                                     # exactly; without it, at least one match
        has_identifier: urn:oid:1.2.250.1.213.1.4.8|{run:265112123104618}
        lacks_identifier: [urn:oid:1.2.250.1.213.1.4.8|{run:265118902404528}]
        equals: {active: false, "link.type": replaced-by}   # FHIRPath → value (a list: all values)
        holds: ["address.exists()"]                  # FHIRPath, true on every match
        linked: {type: replaced-by, to: "urn:oid:…|{run:300030}"}   # a link to the resource holding it

Every expectation applies to each match. ``{run:VALUE}`` is what this run sent for an authored
value (conformance/per_run.py). The system may process asynchronously: checks are tried again
until they all hold or the suite's ``settle_s`` has passed.

For a Passerelle gateway (``--api``), the messages a case sent and the system accepted are also
looked up by their MSH-10 in the admin API: any left ERROR or DEAD fails the case.

Findings name checks, identifiers the suite wrote and server ids, never what the server holds
beyond that: a receiver that ignored the search would otherwise put other patients in a report.
Each check is also a step of the case (report.Step): the search sent and the matches of its last
try, masked (conformance/report.py) unless the run reveals them; each status look-up, likewise.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urljoin

import orjson

from conformance.errors import SuiteError
from conformance.fhir.registry import reference_fhirpath
from conformance.findings import Severity
from conformance.per_run import PerRun
from conformance.report import Assertion, CaseResult, Step, show_json, show_query

CHECK_KEYS: Final = (
    "search",
    "title",
    "where",
    "count",
    "has_identifier",
    "lacks_identifier",
    "equals",
    "holds",
    "linked",
)
_SEARCH: Final = re.compile(r"([A-Z][A-Za-z]+)\?(.+)")
_MAX_PAGES: Final = 20
SETTLED: Final = frozenset({"SENT", "FILTERED"})  # a message the gateway is done with, well
FAILED: Final = frozenset({"ERROR", "DEAD"})


@dataclass(frozen=True, slots=True)
class Link:
    type: str
    to: str  # "system|value" of the resource linked to


@dataclass(frozen=True, slots=True)
class ResultCheck:
    key: str  # where the suite declares it: "then[2]"
    resource_type: str
    query: str  # as written, with {run:…}
    title: str = ""
    where: str | None = None
    count: int | None = None
    has_identifier: tuple[str, ...] = ()
    lacks_identifier: tuple[str, ...] = ()
    equals: tuple[tuple[str, Any], ...] = ()
    holds: tuple[str, ...] = ()
    linked: tuple[Link, ...] = ()

    def texts(self) -> list[str]:
        """Every text that may name run values."""
        return [
            self.query,
            *self.has_identifier,
            *self.lacks_identifier,
            *(link.to for link in self.linked),
        ]


def fhirpath(expression: str) -> Callable[[Any], list[Any]]:
    """fhirpathpy (the reference evaluator, R4 model), compiled once per expression."""
    run = reference_fhirpath(expression)
    return lambda resource: run(resource, None)


# -- declarations -----------------------------------------------------------------------------


def parse_checks(raw: Any, key: str) -> list[ResultCheck]:
    """A case's ``then:`` list; SuiteError names the key at fault (``cases[3].then[0].count``)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SuiteError(f"key {key!r}: a list of checks, each a mapping with 'search'")
    return [_parse_check(item, f"{key}[{index}]") for index, item in enumerate(raw)]


def _parse_check(item: Any, key: str) -> ResultCheck:
    if not isinstance(item, dict):
        raise SuiteError(f"key {key!r}: a mapping with 'search' and expectations")
    unknown = sorted(set(item) - set(CHECK_KEYS))
    if unknown:
        raise SuiteError(f"key '{key}.{unknown[0]}': unknown (known: {', '.join(CHECK_KEYS)})")
    search = item.get("search")
    match = _SEARCH.fullmatch(search) if isinstance(search, str) else None
    if match is None:
        raise SuiteError(f"key '{key}.search': a FHIR search such as Patient?identifier=SYSTEM|VALUE")
    count = item.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise SuiteError(f"key '{key}.count': a whole number of matches, 0 or more")
    title = item.get("title", "")
    if not isinstance(title, str):
        raise SuiteError(f"key '{key}.title': a text")
    where = item.get("where")
    if where is not None:
        _expression(where, f"{key}.where")
    equals = item.get("equals") or {}
    if not isinstance(equals, dict):
        raise SuiteError(f"key '{key}.equals': a mapping of FHIRPath expression to the value expected")
    for expression in equals:
        _expression(expression, f"{key}.equals")
    holds = _list(item.get("holds"), f"{key}.holds")
    for index, expression in enumerate(holds):
        _expression(expression, f"{key}.holds[{index}]")
    return ResultCheck(
        key=key.rsplit(".", 1)[-1],
        resource_type=match.group(1),
        query=match.group(2),
        title=title,
        where=where,
        count=count,
        has_identifier=_identifiers(item.get("has_identifier"), f"{key}.has_identifier"),
        lacks_identifier=_identifiers(item.get("lacks_identifier"), f"{key}.lacks_identifier"),
        equals=tuple(equals.items()),
        holds=tuple(holds),
        linked=_links(item.get("linked"), f"{key}.linked"),
    )


def _list(raw: Any, key: str) -> list[str]:
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(x, str) and x for x in items):
        raise SuiteError(f"key {key!r}: a text or a list of texts")
    return items


def _identifiers(raw: Any, key: str) -> tuple[str, ...]:
    tokens = _list(raw, key)
    for token in tokens:
        system, bar, value = token.partition("|")
        if not (system and bar and value):
            raise SuiteError(f"key {key!r}: {token!r} is not SYSTEM|VALUE")
    return tuple(tokens)


def _links(raw: Any, key: str) -> tuple[Link, ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    links = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"type", "to"}:
            raise SuiteError(f"key {key!r}: {{type: LINK-TYPE, to: SYSTEM|VALUE}}")
        if not isinstance(item["type"], str) or not item["type"]:
            raise SuiteError(f"key '{key}.type': a link type such as replaced-by")
        (to,) = _identifiers(item["to"], f"{key}.to")
        links.append(Link(item["type"], to))
    return tuple(links)


def _expression(expression: Any, key: str) -> None:
    if not isinstance(expression, str) or not expression.strip():
        raise SuiteError(f"key {key!r}: a FHIRPath expression")
    problem = _syntax_problem(expression)
    if problem is None:
        try:  # an unknown function only shows when the expression runs
            fhirpath(expression)({"resourceType": "Patient"})
        except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exceptions
            problem = str(exc)
    if problem is not None:
        raise SuiteError(f"key {key!r}: FHIRPath {expression!r} does not compile: {problem}")


def _syntax_problem(expression: str) -> str | None:
    """fhirpathpy's own parser, made strict: it ignores syntax errors and trailing text."""
    from antlr4 import CommonTokenStream, InputStream, Token  # type: ignore[import-untyped]
    from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
    from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

    parser = FHIRPathParser(CommonTokenStream(FHIRPathLexer(InputStream(expression))))
    parser.removeErrorListeners()
    parser.expression()
    if parser.getNumberOfSyntaxErrors():
        return "syntax error"
    if parser.getCurrentToken().type != Token.EOF:
        return "unexpected text after the expression"
    return None


# -- where results are read ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResultApis:
    """The system's FHIR API and, for a Passerelle gateway, its admin API (``http://HOST:PORT/api``)."""

    fhir: str | None = None
    api: str | None = None
    token: str | None = None
    settle: float = 20.0  # seconds given to asynchronous processing, per case


class Verifier:
    """Runs a case's result checks once its messages are sent; one HTTP session for the run."""

    def __init__(self, apis: ResultApis, run: PerRun, timeout: float = 30.0, *, reveal: bool = False) -> None:
        for url in (apis.fhir, apis.api):
            if url is not None and not url.startswith(("http://", "https://")):
                raise SuiteError(f"expected an http(s):// URL, got {url!r}")
        self.apis = apis
        self.run = run
        self.timeout = timeout  # seconds for each HTTP request
        self.reveal = reveal  # the steps keep what was searched and found unmasked
        self._session: Any = None

    async def __aenter__(self) -> Verifier:
        if self.apis.fhir or self.apis.api:
            import aiohttp

            headers = {"Accept": "application/fhir+json, application/json"}
            if self.apis.token:
                headers["Authorization"] = f"Bearer {self.apis.token}"
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def after(
        self, case: CaseResult, checks: Sequence[ResultCheck], accepted: Sequence[tuple[str, str]]
    ) -> None:
        """``accepted``: (step, MSH-10) of each message the system acknowledged AA or CA."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.apis.settle
        if accepted:
            if self.apis.api:
                for assertion, step in await self._statuses(accepted, deadline):
                    since = len(case.assertions)
                    case.assertions.append(assertion)
                    case.add_step(step, since)
            else:
                case.skip(
                    "MSG-STATUS",
                    ", ".join(where for where, _ in accepted),
                    "statuses not looked up: no admin API given (--api http://HOST:PORT/api, for a Passerelle"
                    " gateway)",
                )
        if not checks:
            return
        if not self.apis.fhir:
            for check in checks:
                label = f"{check.title}: " if check.title else ""
                case.skip(
                    "FHIR", self._location(check), f"{label}not checked: no FHIR API given (--fhir URL)"
                )
            return
        for found, step in await self._fhir(checks, deadline):
            since = len(case.assertions)
            case.assertions += found
            case.add_step(step, since)

    def _location(self, check: ResultCheck) -> str:
        try:
            query = self.run.expand(check.query)
        except SuiteError:
            query = check.query
        return f"{check.key} {check.resource_type}?{query}"

    # -- FHIR -------------------------------------------------------------------------------------

    async def _fhir(
        self, checks: Sequence[ResultCheck], deadline: float
    ) -> list[tuple[list[Assertion], Step]]:
        """Each check's assertions and step, of the last try."""
        loop = asyncio.get_running_loop()
        pause = 0.05
        tries = 0
        while True:
            tries += 1
            found: list[tuple[list[Assertion], Step]] = []
            reachable = True
            for check in checks:
                assertions, reached, step = await self._evaluate(check)
                found.append((assertions, step))
                reachable = reachable and reached
            if not reachable or all(a.passed for f, _ in found for a in f) or loop.time() >= deadline:
                for _, step in found:
                    step.note += f"; try {tries}" if tries > 1 else ""
                return found
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
            pause = min(pause * 2, 1.0)

    async def _evaluate(self, check: ResultCheck) -> tuple[list[Assertion], bool, Step]:
        """The check's assertions, False when the server could not be reached at all, and the step:
        the search sent and the matches found."""
        import aiohttp

        location = self._location(check)
        label = f"{check.title}: " if check.title else ""
        out: list[Assertion] = []
        matches: list[dict[str, Any]] = []
        params = parse_qsl(self.run.expand(check.query), keep_blank_values=True)
        url = urljoin(_base(self.apis.fhir), check.resource_type)
        step = Step(
            check.key,
            f"search {check.resource_type}" + (f" ({check.title})" if check.title else ""),
            "fhir",
            f"GET {url}?{show_query(params, reveal=self.reveal)}",
            timeout=self.timeout,
        )
        started = time.monotonic()

        def verdict(passed: bool, name: str, message: str) -> None:
            # an expectation on the matches is not met by finding none
            passed = passed and (bool(matches) or name in ("FHIR-COUNT", "FHIR-SEARCH"))
            severity = Severity.INFORMATION if passed else Severity.ERROR
            out.append(Assertion(name, passed, severity, location, label + message))

        try:
            matches = await self._search(check.resource_type, params)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            why = f"the FHIR API cannot be reached: {type(exc).__name__}"
            if isinstance(exc, TimeoutError):
                why += f", no answer within the time-out of {self.timeout:g} s"
            verdict(False, "FHIR-SEARCH", why)
            step.note, step.seconds = why, time.monotonic() - started
            return out, False, step
        except _HttpError as exc:
            verdict(False, "FHIR-SEARCH", str(exc))
            step.note, step.seconds = str(exc), time.monotonic() - started
            return out, True, step
        step.seconds = time.monotonic() - started
        step.received = show_json(matches, reveal=self.reveal)
        step.note = f"{len(matches)} match(es)"
        if check.where:
            matches = [m for m in matches if _truth(_run(check.where, m))]
            step.note += f", {len(matches)} where {check.where}"
        ids = ", ".join(_ref(m) for m in matches) or "none"
        counted = f"{len(matches)} match(es){' where ' + check.where if check.where else ''} ({ids})"
        if check.count is not None:
            verdict(len(matches) == check.count, "FHIR-COUNT", f"exactly {check.count} expected; {counted}")
        else:
            verdict(bool(matches), "FHIR-COUNT", f"at least one expected; {counted}")
        for token in check.has_identifier:
            sent = self.run.expand(token)
            missing = [m for m in matches if not _has_identifier(m, sent)]
            verdict(not missing, "FHIR-IDENTIFIER", _every(matches, missing, f"holds identifier {sent}"))
        for token in check.lacks_identifier:
            sent = self.run.expand(token)
            holding = [m for m in matches if _has_identifier(m, sent)]
            verdict(not holding, "FHIR-NO-IDENTIFIER", _every(matches, holding, f"lacks identifier {sent}"))
        for expression, expected in check.equals:
            wrong = [(m, got) for m in matches if (got := _run(expression, m)) != _expected(expected)]
            text = f"{expression} = {_show(expected)}"
            if wrong:
                text += "; found " + ", ".join(f"{_shape(got)} on {_ref(m)}" for m, got in wrong)
            verdict(not wrong, "FHIR-EQUALS", _every(matches, [m for m, _ in wrong], text))
        for expression in check.holds:
            wrong_ones = [m for m in matches if not _truth(_run(expression, m))]
            verdict(not wrong_ones, "FHIR-HOLDS", _every(matches, wrong_ones, f"{expression} is true"))
        for link in check.linked:
            to = self.run.expand(link.to)
            unlinked = [m for m in matches if not await self._links_to(m, link.type, to)]
            verdict(
                not unlinked,
                "FHIR-LINK",
                _every(matches, unlinked, f"has a link of type {link.type} to the resource holding {to}"),
            )
        return out, True, step

    async def _search(self, resource_type: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        base = _base(self.apis.fhir)
        url: str | None = urljoin(base, resource_type)
        matches: list[dict[str, Any]] = []
        query: list[tuple[str, str]] | None = params
        for _ in range(_MAX_PAGES):
            if url is None:
                break
            bundle = await self._get_json(url, query)
            query = None  # a next link carries its own query
            if bundle.get("resourceType") != "Bundle":
                raise _HttpError("the search did not answer a Bundle")
            entries = bundle.get("entry")
            for entry in entries if isinstance(entries, list) else []:
                if not isinstance(entry, dict):
                    continue
                resource = entry.get("resource")
                search = entry.get("search")
                mode = search.get("mode", "match") if isinstance(search, dict) else "match"  # not includes
                if (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == resource_type
                    and mode == "match"
                ):
                    matches.append(resource)
            url = next(
                (
                    str(link.get("url"))
                    for link in _items(bundle.get("link"))
                    if isinstance(link, dict) and link.get("relation") == "next" and link.get("url")
                ),
                None,
            )
        return matches

    async def _links_to(self, resource: Mapping[str, Any], kind: str, token: str) -> bool:
        for link in _items(resource.get("link")):
            if not isinstance(link, dict) or link.get("type") != kind:
                continue
            other = link.get("other")
            if not isinstance(other, dict):
                continue
            if _has_identifier({"identifier": [other.get("identifier")]}, token):  # a logical reference
                return True
            reference = other.get("reference")
            if isinstance(reference, str) and reference and not reference.startswith("#"):
                try:
                    target = await self._get_json(urljoin(_base(self.apis.fhir), reference), None)
                except _HttpError:
                    continue
                if _has_identifier(target, token):
                    return True
        return False

    async def _get_json(self, url: str, params: list[tuple[str, str]] | None) -> dict[str, Any]:
        async with self._session.get(url, params=params) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise _HttpError(f"GET {resp.url.path} answered HTTP {resp.status}")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise _HttpError(f"GET {url.split('?')[0]} did not answer JSON") from exc
        if not isinstance(data, dict):
            raise _HttpError(f"GET {url.split('?')[0]} did not answer a JSON object")
        return data

    # -- Passerelle admin API ---------------------------------------------------------------------

    async def _statuses(
        self, accepted: Sequence[tuple[str, str]], deadline: float
    ) -> list[tuple[Assertion, Step]]:
        """Polls ``GET /api/messages?control_id=…`` until each message is done with, or the deadline:
        an assertion and a step (the look-up and the rows of its last try) per message."""
        import aiohttp

        loop = asyncio.get_running_loop()
        url = self.apis.api.rstrip("/") + "/messages" if self.apis.api else ""
        rows: dict[str, list[dict[str, Any]]] = {}
        tries: dict[str, int] = {}
        started = time.monotonic()

        def step(where: str, control_id: str) -> Step:
            return Step(
                f"{where} status",
                "look up the message by its MSH-10 (admin API)",
                "http",
                f"GET {url}?control_id={control_id}&limit=100",
                timeout=self.timeout,
                seconds=time.monotonic() - started,
            )

        pause = 0.05
        while True:
            for where, control_id in accepted:
                if _final(rows.get(control_id)):
                    continue
                tries[control_id] = tries.get(control_id, 0) + 1
                try:
                    body = await self._get_json(url, [("control_id", control_id), ("limit", "100")])
                except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                    why = f"cannot be reached: {type(exc).__name__}"
                    if isinstance(exc, TimeoutError):
                        why += f", no answer within the time-out of {self.timeout:g} s"
                    failed = step(where, control_id)
                    failed.note = f"the admin API {why}"
                    return [(_failed("MSG-STATUS", "admin API", why), failed)]
                except _HttpError as exc:
                    failed = step(where, control_id)
                    failed.note = str(exc)
                    return [(_failed("MSG-STATUS", "admin API", str(exc)), failed)]
                found = body.get("messages")
                rows[control_id] = (
                    [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []
                )
            if all(_final(rows.get(c)) for _, c in accepted) or loop.time() >= deadline:
                break
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
            pause = min(pause * 2, 1.0)
        out = []
        for where, control_id in accepted:
            found_rows = rows.get(control_id) or []
            done = step(where, control_id)
            # the rows as the admin API lists them, reduced to what names no patient
            done.received = show_json(
                [{k: r.get(k) for k in ("id", "channel", "status")} for r in found_rows], reveal=True
            )
            done.note = f"{len(found_rows)} message(s); try {tries.get(control_id, 0)}"
            out.append((_status_assertion(where, control_id, found_rows, self.apis.settle), done))
        return out


class _HttpError(Exception):
    """An answer the checks cannot use; the text says which request and what came back."""


def _final(rows: list[dict[str, Any]] | None) -> bool:
    # ERROR is not final: a delivery in ERROR is retried and may still succeed.
    return bool(rows) and all(r.get("status") in SETTLED or r.get("status") == "DEAD" for r in rows or [])


def _status_assertion(where: str, control_id: str, rows: list[dict[str, Any]], settle: float) -> Assertion:
    location = f"{where} MSH-10 {control_id}"
    if not rows:
        return _failed("MSG-STATUS", location, "the gateway holds no message with this MSH-10")
    bad = [r for r in rows if r.get("status") in FAILED]
    late = [r for r in rows if r.get("status") not in FAILED and r.get("status") not in SETTLED]
    described = "; ".join(
        f"message {r.get('id')} (channel {r.get('channel')}) is {r.get('status')}" for r in bad + late
    )
    if bad:
        return _failed("MSG-STATUS", location, f"{described} (GET /api/messages/ID shows its trace)")
    if late:
        return _failed("MSG-STATUS", location, f"{described} after {settle:g} s: not processed in time")
    done = ", ".join(f"{r.get('id')} {r.get('status')}" for r in rows)
    return Assertion("MSG-STATUS", True, Severity.INFORMATION, location, f"processed: {done}")


def _failed(check: str, location: str, message: str) -> Assertion:
    return Assertion(check, False, Severity.ERROR, location, message)


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _base(url: str | None) -> str:
    return (url or "").rstrip("/") + "/"


def _run(expression: str, resource: Mapping[str, Any]) -> list[Any]:
    try:
        return list(fhirpath(expression)(resource))
    except Exception:  # noqa: BLE001 - an expression failing on a resource is not a match
        return []


def _truth(values: list[Any]) -> bool:
    return values == [True]


def _expected(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _show(value: Any) -> str:
    return orjson.dumps(value).decode()


def _shape(values: list[Any]) -> str:
    """What was found, shown only when it cannot be patient data (booleans, numbers, nothing)."""
    if all(isinstance(v, bool | int | float) for v in values):
        return _show(values) if len(values) != 1 else _show(values[0])
    return f"{len(values)} other value(s)"


def _ref(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _has_identifier(resource: Mapping[str, Any], token: str) -> bool:
    system, _, value = token.partition("|")
    found = resource.get("identifier")
    return isinstance(found, list) and any(
        isinstance(i, dict) and i.get("system") == system and i.get("value") == value for i in found
    )


def _every(matches: list[dict[str, Any]], wrong: list[dict[str, Any]], text: str) -> str:
    if not matches:
        return f"{text}: no match to check"
    if wrong:
        return f"{text}: not so on {', '.join(_ref(m) for m in wrong)}"
    return f"{text}: so on {', '.join(_ref(m) for m in matches)}"
