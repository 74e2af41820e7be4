"""PAM FR 2.11 rules (IHE PAM, French national extension) on top of the v2.5 structure.

Each rule has a stable id, documented in conformance/rules.md. Locations are ER7 paths.
"""

from __future__ import annotations

from typing import Final

from conformance.findings import Finding, Severity
from gateway.hl7.er7 import Message

# Trigger → the structure PAM FR defines for it (ITI-30 identity feed, ITI-31 movements).
TRIGGERS: Final[dict[str, str]] = {
    # ITI-30
    "A28": "ADT_A05",
    "A31": "ADT_A05",
    "A40": "ADT_A39",
    "A47": "ADT_A30",
    # ITI-31: inserts and their cancellations
    "A05": "ADT_A05",
    "A38": "ADT_A38",
    "A01": "ADT_A01",
    "A04": "ADT_A01",
    "A11": "ADT_A09",
    "A06": "ADT_A06",
    "A07": "ADT_A06",
    "A02": "ADT_A02",
    "A12": "ADT_A12",
    "A54": "ADT_A54",
    "A55": "ADT_A52",
    "A03": "ADT_A03",
    "A13": "ADT_A01",
    "A21": "ADT_A21",
    "A52": "ADT_A52",
    "A22": "ADT_A21",
    "A53": "ADT_A52",
    "A14": "ADT_A05",
    "A27": "ADT_A21",
    "A15": "ADT_A15",
    "A26": "ADT_A21",
    "A16": "ADT_A16",
    "A25": "ADT_A21",
    "A44": "ADT_A43",
    "Z99": "ADT_A01",
}
IDENTITY_TRIGGERS: Final = frozenset({"A28", "A31", "A40", "A47"})
# ITI-31 movements: they carry ZBE and PID-18 (the NDA).
MOVEMENT_TRIGGERS: Final = frozenset(TRIGGERS) - IDENTITY_TRIGGERS - {"A44"}
# Triggers whose only purpose is to cancel a movement (A06/A07 cancel each other but also insert).
CANCEL_TRIGGERS: Final = frozenset({"A38", "A11", "A12", "A55", "A13", "A52", "A53", "A27", "A26", "A25"})

MSH12: Final = ("2.5", "FRA", "2.11")
MSH21: Final = ("2.11", "IHE_FRANCE-2.11-PAM")
ZBE4_VALUES: Final = frozenset({"INSERT", "UPDATE", "CANCEL"})
# Table 0445 as PAM FR 2.11 extends it; HOMA, FICT and DOUT only as extra repetitions.
PID32_STATUS: Final = frozenset(
    {
        *("VIDE", "PROV", "VALI", "DOUB", "DESA", "DPOT", "DOUA", "COLP", "COLV"),
        *("FILI", "CACH", "ANOM", "IDVER", "RECD", "IDRA", "USUR", "HOMD", "INVA"),
    }
)
PID32_ATTRIBUTES: Final = frozenset({"HOMA", "FICT", "DOUT"})
INS_OIDS: Final = frozenset(
    {"1.2.250.1.213.1.4.8", "1.2.250.1.213.1.4.9", "1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.11"}
)
FORBIDDEN_PID: Final = (10, 17, 19, 22)
PV1_2_VALUES: Final = frozenset({"E", "I", "N", "O", "R", "V"})

TRIGGER: Final = "PAMFR-TRIG-001"
A08: Final = "PAMFR-TRIG-002"
STRUCTURE: Final = "PAMFR-STRUCT-001"
VERSION: Final = "PAMFR-MSH12-001"
PROFILE: Final = "PAMFR-MSH21-001"
ZBE_MISSING: Final = "PAMFR-ZBE-001"
ZBE_ID: Final = "PAMFR-ZBE-002"
ZBE3: Final = "PAMFR-ZBE-003"
ZBE4: Final = "PAMFR-ZBE-004"
ZBE_UPDATE: Final = "PAMFR-ZBE-005"
ZBE6: Final = "PAMFR-ZBE-006"
Z99_ACTION: Final = "PAMFR-ZBE-007"
CANCEL_ACTION: Final = "PAMFR-ZBE-008"
PID32: Final = "PAMFR-PID32-001"
INS_WITHOUT_VALI: Final = "PAMFR-INS-001"
FORBIDDEN: Final = "PAMFR-PID-001"
PID18: Final = "PAMFR-PID18-001"
BIRTHPLACE: Final = "PAMFR-BDL-001"
PATIENT_CLASS: Final = "PAMFR-PV1-001"

_E, _W = Severity.ERROR, Severity.WARNING


def check(msg: Message) -> list[Finding]:
    """The PAM FR findings for one ADT message."""
    out: list[Finding] = []
    trigger = msg.trigger
    structure = msg.structure
    if trigger == "A08":
        out.append(
            Finding(A08, _E, "MSH-9.2", "A08 is not used in France: A31 updates identity, Z99 a movement")
        )
    elif trigger not in TRIGGERS:
        out.append(Finding(TRIGGER, _E, "MSH-9.2", f"trigger {trigger or '(empty)'} is not a PAM FR event"))
    else:
        wanted = TRIGGERS[trigger]
        if structure != wanted:
            out.append(
                Finding(
                    STRUCTURE,
                    _E,
                    "MSH-9.3",
                    f"ADT^{trigger} must declare structure {wanted}, not {structure or '(empty)'}",
                    "structure",
                )
            )
    _header(msg, out)
    if trigger in MOVEMENT_TRIGGERS:
        _zbe(msg, trigger, out)
        if not msg.get("PID-18.1"):
            out.append(
                Finding(
                    PID18, _E, "PID-18", "PID-18 (account number, NDA) is required on movements", "required"
                )
            )
    _pid(msg, out)
    for occurrence, pv1 in enumerate(msg.segments_named("PV1"), 1):
        value = pv1.field(2)
        if value and value.split(msg.separators.component, 1)[0] not in PV1_2_VALUES:
            where = "PV1-2" if occurrence == 1 else f"PV1[{occurrence}]-2"
            out.append(
                Finding(PATIENT_CLASS, _E, where, "PV1-2 must be one of E, I, N, O, R, V", "code-invalid")
            )
    return out


def _header(msg: Message, out: list[Finding]) -> None:
    version = (msg.get("MSH-12.1"), msg.get("MSH-12.2.1"), msg.get("MSH-12.3.1"))
    # MSH-12.2 and MSH-12.3 are CE: their first subcomponent is the code.
    if version != MSH12:
        out.append(Finding(VERSION, _E, "MSH-12", "MSH-12 must be 2.5^FRA^2.11", "value"))
    reps = msg.repetitions("MSH-21")
    seps = msg.separators
    if not any(tuple(r.split(seps.component)[:2]) == MSH21 for r in reps):
        out.append(Finding(PROFILE, _E, "MSH-21", "MSH-21 must hold 2.11^IHE_FRANCE-2.11-PAM", "value"))


def _zbe(msg: Message, trigger: str, out: list[Finding]) -> None:
    zbe = msg.segment("ZBE")
    if zbe is None:
        out.append(
            Finding(
                ZBE_MISSING, _E, "ZBE", f"ADT^{trigger} is a movement: a ZBE segment is required", "required"
            )
        )
        return
    if not msg.get("ZBE-1.1"):
        out.append(Finding(ZBE_ID, _E, "ZBE-1", "ZBE-1 (movement id) is required", "required"))
    if not msg.get("ZBE-2.1"):
        out.append(Finding(ZBE_ID, _E, "ZBE-2", "ZBE-2 (movement date/time) is required", "required"))
    if zbe.field(3):
        out.append(Finding(ZBE3, _E, "ZBE-3", "ZBE-3 must be empty in PAM FR", "value"))
    action = msg.get("ZBE-4")
    if action not in ZBE4_VALUES:
        out.append(Finding(ZBE4, _E, "ZBE-4", "ZBE-4 must be INSERT, UPDATE or CANCEL", "code-invalid"))
    if action == "UPDATE" and trigger != "Z99":
        out.append(Finding(ZBE_UPDATE, _E, "ZBE-4", "ZBE-4 UPDATE is only allowed on Z99", "business-rule"))
    if trigger == "Z99" and action in ZBE4_VALUES and action != "UPDATE":
        out.append(
            Finding(Z99_ACTION, _E, "ZBE-4", "Z99 updates a movement: ZBE-4 must be UPDATE", "business-rule")
        )
    if trigger in CANCEL_TRIGGERS and action in ZBE4_VALUES and action != "CANCEL":
        out.append(
            Finding(
                CANCEL_ACTION,
                _E,
                "ZBE-4",
                f"{trigger} cancels a movement: ZBE-4 must be CANCEL",
                "business-rule",
            )
        )
    if action in ("UPDATE", "CANCEL") and not msg.get("ZBE-6"):
        out.append(
            Finding(
                ZBE6, _E, "ZBE-6", f"ZBE-6 (original trigger) is required when ZBE-4 is {action}", "required"
            )
        )


def _pid(msg: Message, out: list[Finding]) -> None:
    for occurrence, pid in enumerate(msg.segments_named("PID"), 1):
        prefix = "PID" if occurrence == 1 else f"PID[{occurrence}]"
        seps = msg.separators
        for number in FORBIDDEN_PID:
            if pid.field(number):
                out.append(
                    Finding(FORBIDDEN, _E, f"{prefix}-{number}", f"PID-{number} must not be sent in PAM FR")
                )
        statuses = [r for r in pid.field(32).split(seps.repetition) if r]
        for index, code in enumerate(statuses, 1):
            allowed = PID32_STATUS if index == 1 else PID32_STATUS | PID32_ATTRIBUTES
            if code not in allowed:
                out.append(
                    Finding(
                        PID32,
                        _E,
                        f"{prefix}-32[{index}]",
                        "PID-32 must be a table 0445 status (HOMA, FICT, DOUT only after it)",
                        "code-invalid",
                    )
                )
        ins_at = [
            index
            for index, rep in enumerate(pid.field(3).split(seps.repetition), 1)
            if _is_ins(rep, seps.component, seps.subcomponent)
        ]
        qualified = "VALI" in statuses
        if ins_at and not qualified:
            out.append(
                Finding(
                    INS_WITHOUT_VALI,
                    _E,
                    f"{prefix}-3[{ins_at[0]}]",
                    "an INS travels only with PID-32 VALI (qualified identity)",
                    "business-rule",
                )
            )
        if ins_at and qualified and not _has_birthplace(pid.field(11), seps.repetition, seps.component):
            out.append(
                Finding(
                    BIRTHPLACE,
                    _E,
                    f"{prefix}-11",
                    "a qualified INS needs the birthplace: a PID-11 repetition with XAD-7 BDL and XAD-9",
                    "required",
                )
            )


def _is_ins(rep: str, comp: str, sub: str) -> bool:
    parts = rep.split(comp)
    if len(parts) > 4 and parts[4] == "INS":
        return True
    if len(parts) > 3:
        authority = parts[3].split(sub)
        return len(authority) > 1 and authority[1] in INS_OIDS
    return False


def _has_birthplace(field: str, rep_sep: str, comp: str) -> bool:
    for rep in field.split(rep_sep):
        parts = rep.split(comp)
        if len(parts) > 8 and parts[6] == "BDL" and parts[8]:
            return True
    return False
