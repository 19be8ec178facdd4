"""The conformance report: checks with a status, shown as a table, JSON or JUnit XML."""

from __future__ import annotations

import collections
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Literal

__all__ = ["Check", "Report", "Status"]

Status = Literal["pass", "fail", "skip"]

# What XML 1.0 cannot hold, even escaped: control characters and lone surrogates.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    """text with each character XML cannot hold shown as its escape (\\x1b), so a detail
    carrying one still makes a valid JUnit file."""
    return _NOT_XML.sub(lambda m: ascii(m[0])[1:-1], text)


@dataclass(frozen=True)
class Check:
    """One check: what it looked at (name, group), how it went, and why (detail)."""

    name: str
    group: str
    status: Status
    detail: str = ""


@dataclass
class Report:
    """Every check of one run, in the order run, and the kernel it ran against."""

    kernel: str
    device: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, group: str, status: Status, detail: str = "") -> Check:
        if status not in ("pass", "fail", "skip"):
            raise ValueError(f"status must be pass, fail or skip, not {status!r}")
        check = Check(name, group, status, detail)
        self.checks.append(check)
        return check

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def exit_code(self) -> int:
        """0: every check passed or was skipped with a reason; 1: a check failed."""
        return 1 if self.failed else 0

    def counts(self) -> dict[str, dict[Status, int]]:
        """{group: {status: how many}}, groups in the order they first appear."""
        out: dict[str, dict[Status, int]] = {}
        for c in self.checks:
            out.setdefault(c.group, {"pass": 0, "fail": 0, "skip": 0})[c.status] += 1
        return out

    def to_json(self) -> str:
        return json.dumps({"kernel": self.kernel, "device": self.device,
                           "counts": self.counts(), "checks": [asdict(c) for c in self.checks]},
                          indent=2)

    def table(self, *, verbose: bool = False) -> str:
        """Grouped, with counts. Passing checks of a group with many are summed up unless
        verbose; failures, skips and passes with a note ("note: ...") are always listed."""
        lines = [f"KVM conformance of {self.kernel} ({self.device})", ""]
        by_group: dict[str, list[Check]] = collections.defaultdict(list)
        for c in self.checks:
            by_group[c.group].append(c)
        width = max((len(c.name) for c in self.checks), default=0)
        for group, n in self.counts().items():
            lines.append(f"{group}: {n['pass']} passed, {n['fail']} failed, {n['skip']} skipped")
            checks = by_group[group]
            quiet = not verbose and n["pass"] > 20
            for c in checks:
                if quiet and c.status == "pass" and not c.detail.startswith("note:"):
                    continue
                lines.append(f"  {c.status.upper():4}  {c.name:<{width}}  {c.detail}".rstrip())
            if quiet:
                lines.append(f"  ({n['pass']} passing checks not listed: --verbose shows them)")
            lines.append("")
        total = collections.Counter(c.status for c in self.checks)
        lines.append(f"{len(self.checks)} checks: {total['pass']} passed, {total['fail']} failed, "
                     f"{total['skip']} skipped")
        return "\n".join(lines)

    def to_junit(self) -> str:
        """JUnit XML: one testsuite per group, one testcase per check."""
        suites = ET.Element("testsuites", name="kvm-bindings conformance",
                            tests=str(len(self.checks)), failures=str(len(self.failed)))
        by_group: dict[str, list[Check]] = collections.defaultdict(list)
        for c in self.checks:
            by_group[c.group].append(c)
        for group, checks in by_group.items():
            n = self.counts()[group]
            suite = ET.SubElement(suites, "testsuite", name=_xml_text(group), tests=str(len(checks)),
                                  failures=str(n["fail"]), skipped=str(n["skip"]), errors="0")
            for c in checks:
                detail = _xml_text(c.detail)
                case = ET.SubElement(suite, "testcase", classname=_xml_text(f"conformance.{group}"),
                                     name=_xml_text(c.name))
                if c.status == "fail":
                    ET.SubElement(case, "failure", message=detail).text = detail
                elif c.status == "skip":
                    ET.SubElement(case, "skipped", message=detail)
                elif detail:
                    ET.SubElement(case, "system-out").text = detail
        ET.indent(suites)
        return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
