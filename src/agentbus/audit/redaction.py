"""Redaction of inbound text: secrets and personal data are masked before the event is written.

Pure: text in, masked text and what was found out. No I/O, no settings object (the caller passes
the national-id patterns and the kinds to look for).

Each kind has its detectors (compiled once per configuration); a match whose kind has a check
(Luhn, IBAN country length and mod-97, entropy, digit counts) is masked only when the check
passes. Where findings overlap, the one starting first wins. A mask names the kind,
`[redacted:email]`; for `url_password`, `bearer_token` after `Bearer`, and `key=`/`password=`
assignments only the secret part is replaced, so `postgres://ada:[redacted:url_password]@db`
still reads. Findings are counts per kind, never the values.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from agentbus.errors import AgentbusError
from agentbus.values import value

Kind = Literal[
    "private_key",
    "url_password",
    "bearer_token",
    "api_key",
    "password",
    "email",
    "iban",
    "card_number",
    "national_id",
    "phone",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
"""Every kind, in the order findings are reported."""

DEFAULT_NATIONAL_IDS: dict[str, str] = {
    # US Social Security number, dashed; area 000, 666 and 9xx, group 00, serial 0000 never issued
    "us_ssn": (
        r"\d\d\d-\d\d-\d\d\d\d(?<!000-\d\d-\d{4})(?<!666-\d\d-\d{4})(?<!9\d\d-\d\d-\d{4})"
        r"(?<!-00-\d{4})(?<!-0000)"
    ),
    # UK National Insurance number; prefixes BG GB KN NK NT TN ZZ are never allocated
    "uk_nino": (
        r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z](?<!BG|GB|KN|NK|NT|TN|ZZ)"
        r" ?\d{2} ?\d{2} ?\d{2} ?[A-D]"
    ),
}
"""Shipped national-id patterns (`AGENTBUS_REDACTION_NATIONAL_IDS` replaces them)."""

_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


class InvalidRedactionPattern(AgentbusError, ValueError):
    """A configured national-id pattern is not usable (bad name, not a regular expression,
    matches empty text), or an unknown kind was asked for."""


def mask(kind: str) -> str:
    return f"[redacted:{kind}]"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    count: int


@value
class Redacted:
    text: str
    """The text with every finding masked (the input itself when nothing was found)."""
    findings: tuple[Finding, ...] = ()
    """How many of each kind were masked, in `KINDS` order. Never the values."""
    truncated: bool = False
    """Masks made the text longer than `max_length`: it was cut there (never inside a mask)."""

    @property
    def masked(self) -> bool:
        return bool(self.findings)


# ---------------------------------------------------------------------------- checks (pure)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# fmt: off
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
# fmt: on
"""IBAN length per country (ISO 13616 registry)."""


def iban_valid(compact: str) -> bool:
    """`compact`: no spaces, upper case. Country length and the mod-97 check digits."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def shannon_entropy(value: str) -> float:
    """Bits per character."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


# A check gets the matched text and answers how much of it to mask (a prefix length), or None
# to leave it (the scan then resumes just after the match's start).
Check = Callable[[str], int | None]


def _whole(text: str) -> int | None:
    return len(text)


def _card(text: str) -> int | None:
    # Luhn-valid, 13-19 digits; a short last group may be a number after the card ("4111 1111
    # 1111 1111 2 times") rather than part of it: then the card without it.
    last_group = max(text.rfind(" "), text.rfind("-"))
    for end in (len(text), last_group) if last_group > 0 else (len(text),):
        digits = text[:end].replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return end
    return None


def _iban(text: str) -> int | None:
    length = IBAN_LENGTHS.get(text[:2])
    if length is None:
        return None
    seen = 0
    for end, char in enumerate(text, start=1):
        if char != " ":
            seen += 1
        if seen == length:
            # the IBAN must end where the text does or at a group boundary
            if end < len(text) and text[end] != " ":
                return None
            return end if iban_valid(text[:end].replace(" ", "")) else None
    return None


def _digits_between(low: int, high: int) -> Check:
    def check(text: str) -> int | None:
        return len(text) if low <= sum(c.isdigit() for c in text) <= high else None

    return check


_PLACEHOLDERS = frozenset({"none", "null", "nil", "true", "false", "undefined", "changeme"})


def _secret_value(text: str) -> int | None:
    # `key=<value>` / `token: <value>`: only values that look random (letters and digits,
    # >= 3 bits of entropy per character) are secrets; identifiers and prose are not.
    value = text.strip("\"'")
    if len(value) < 16 or "(" in value or value.lower() in _PLACEHOLDERS:
        return None
    if not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
        return None
    return len(text) if shannon_entropy(value) >= 3.0 else None


def _password_value(text: str) -> int | None:
    value = text.strip("\"'")
    if len(value) < 6 or "(" in value or "://" in value or value.lower() in _PLACEHOLDERS:
        return None
    return len(text) if not value.isalpha() else None


# ---------------------------------------------------------------------------- the detectors

_WORD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"
_NUMBERISH = _WORD + ".+/:-"  # a phone or card number does not continue one of these
_END = r"(?![A-Za-z0-9_])"
_PHONE_END = r"(?![A-Za-z0-9_]|[.:/-]\d)"  # not the start of a date, version, time or path

_DIGIT_RUN = re.compile(r"\d(?:[ ().+/-]{0,3}\d){6}")
"""7 digits close together: what every card number and phone number has."""
_ASCII_DIGITS = b"0123456789"

Needs = Callable[[str, str], bool]
"""(text, lower-cased text) -> whether a detector can match at all: skips its scan cheaply."""


def _contains(*needles: str, lower: bool = False) -> Needs:
    # Called for every detector on every message: a plain `in` per needle, without the
    # generator `any(...)` would build (which cost more than the tests themselves).
    if len(needles) == 1:
        (needle,) = needles
        if lower:
            return lambda _, lowered: needle in lowered
        return lambda text, _: needle in text

    # Needles with a `-` or `_` (most vendor key prefixes) are looked for only in text that
    # has one: two tests instead of one per needle, for most text.
    marked = tuple(n for n in needles if "-" in n or "_" in n)
    plain = tuple(n for n in needles if n not in marked)

    def contains(text: str, lowered: str) -> bool:
        scanned = lowered if lower else text
        for needle in plain:
            if needle in scanned:
                return True
        if "-" in scanned or "_" in scanned:
            for needle in marked:
                if needle in scanned:
                    return True
        return False

    return contains


@dataclass(frozen=True, slots=True)
class _Detector:
    kind: Kind
    expression: str
    not_after: str = ""
    """Characters that may not come right before a match (a word boundary, in effect)."""
    groups: tuple[str, ...] = ()
    """Mask only the first of these groups that took part in the match (else the match)."""
    check: Check = _whole
    needs: Needs | None = None
    numeric: bool = False
    """Every match has 7 or more digits close together: skipped when the text has none."""
    lower: bool = False
    """`expression` is lower case and searched in the lower-cased text (ignoring case, but
    with a literal start CPython's `re` can skip ahead to)."""
    anchor: str | None = None
    """A character every match has within its first 65: the scan jumps from one to the next."""
    opaque: Callable[[str], bool] | None = None
    """Whether a match `check` refused still hides what it covers from the detectors after
    it (an account number that is no valid IBAN is not a card or phone number either)."""


_VENDOR_PREFIXES = (
    *("sk-", "sk_", "rk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    *("xox", "AKIA", "ASIA", "AIza", "ab_"),
)
"""What each vendor key starts with (a cheap test before the scan)."""

# In priority order: where matches of two detectors overlap, the one starting first wins, and
# of two starting at the same place, the one listed first.
_DETECTORS: tuple[_Detector, ...] = (
    _Detector(
        "private_key",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"(?:(?s:.*?)-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        # a block cut short: its header and base64 lines, up to the first line that is neither
        r"|(?:[ \t]*\r?\n[ \t]*(?:[A-Za-z0-9+/]+={0,2}|[A-Za-z-]+:[^\n]*))*)",
        needs=_contains("-----BEGIN"),
    ),
    _Detector(
        "url_password",
        r"(?<=[A-Za-z0-9]://)[^\s:/?#@\[\]]*:(?P<pw>[^\s/?#]+)@(?=[A-Za-z0-9\[])",
        groups=("pw",),
        needs=_contains("://"),
    ),
    _Detector(
        "bearer_token",
        r"bearer\s+(?P<token>(?=[a-z0-9._~+/-]*\d)[a-z0-9._~+/-]{16,}=*)",
        not_after=_WORD,
        groups=("token",),
        needs=_contains("bearer", lower=True),
        lower=True,
    ),
    _Detector(
        "bearer_token",
        r"authorization\s*:\s*basic\s+(?P<token>[a-z0-9+/]{8,}={0,2})",
        not_after=_WORD,
        groups=("token",),
        needs=_contains("basic", lower=True),
        lower=True,
    ),
    _Detector(  # a JSON Web Token
        "bearer_token",
        r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
        not_after=_WORD,
        needs=_contains("eyJ"),
    ),
    _Detector(
        "api_key",
        r"(?:sk-(?:proj-|ant-(?:api|admin)\d\d-)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic
        r"|sk_(?:live|test)_[A-Za-z0-9]{16,}|rk_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
        r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,}"  # GitHub
        r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
        r"|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"  # AWS access key ids
        r"|AIza[0-9A-Za-z_-]{35}"  # Google
        r"|ab_[a-z0-9]{8,32}_[A-Za-z0-9_-]{16,}"  # agentbus's own API keys
        r")" + _END,
        not_after=_WORD,
        needs=_contains(*_VENDOR_PREFIXES),
    ),
    _Detector(  # `api_key=...`, `"client_secret": "..."`, `GITHUB_TOKEN=...`
        "api_key",
        r"(?:api[_-]?key|secret|token|access[_-]?key|private[_-]?key|auth[_-]?key)"
        r"[a-z0-9_.-]{0,40}[\"']?\s*[:=]\s*(?P<value>[\"']?[^\s\"'`,;<>]{16,}[\"']?)",
        groups=("value",),
        check=_secret_value,
        needs=_contains("key", "secret", "token", lower=True),
        lower=True,
    ),
    _Detector(
        "password",
        r"(?:password|passwd|passphrase|pwd)[a-z0-9_.-]{0,40}[\"']?\s*[:=]\s*"
        r"(?P<value>[\"']?[^\s\"'`,;<>]{6,}[\"']?)",
        groups=("value",),
        check=_password_value,
        needs=_contains("pass", "pwd", lower=True),
        lower=True,
    ),
    _Detector(
        "email",
        r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
        r"(?!(?:png|jpe?g|gif|svg|webp|ico|css|js|ts|py|json|md|txt|html?)(?![A-Za-z]))"
        r"[A-Za-z]{2,24}(?![A-Za-z0-9-]|:\S)",  # `git@host:org/repo` is not an address
        not_after=_WORD + ".%+-",
        needs=_contains("@"),
        anchor="@",
    ),
    _Detector(
        "iban",
        r"[A-Z][A-Z]\d\d(?: ?[A-Z0-9]){11,30}" + _END,
        not_after=_WORD,
        check=_iban,
        opaque=lambda _: True,
    ),
    _Detector(
        "card_number",
        # as printed: no separators, groups of four (the last may be shorter) or 4-6-5/4-6-4
        r"[2-6]\d{3}(?:\d{9,15}"
        r"|(?P<s>[ -])\d{4}(?P=s)\d{4}(?P=s)\d{1,4}(?:(?P=s)\d{1,3})?"
        r"|(?P<a>[ -])\d{6}(?P=a)\d{4,5})(?![A-Za-z0-9_]|[.-]\d)",
        not_after=_NUMBERISH,
        check=_card,
        numeric=True,
    ),
    # national ids are inserted here
    _Detector(  # international: +<country code> and 7-14 more digits
        "phone",
        r"\+[1-9]\d{0,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){1,6}" + _PHONE_END,
        not_after=_WORD + "+",
        check=_digits_between(8, 15),
        numeric=True,
    ),
    _Detector(  # North America: (415) 555-2671
        "phone",
        r"\([2-9]\d\d\)[ .-]?[2-9]\d\d[ .-]\d{4}" + _PHONE_END,
        not_after=_WORD,
        numeric=True,
    ),
    _Detector(  # North America: 415-555-2671, 415.555.2671
        "phone",
        r"[2-9]\d\d(?P<sep>[.-])[2-9]\d\d(?P=sep)\d{4}" + _PHONE_END,
        not_after=_NUMBERISH,
        numeric=True,
    ),
    _Detector(  # with a trunk prefix: 020 7946 0958, 030 1234567, 06 12 34 56 78
        "phone",
        r"0(?:\d{1,4}[ -]\d{3,4}(?:[ -]?\d{3,4})?|[1-9](?:[ .]\d\d){4})" + _PHONE_END,
        not_after=_NUMBERISH,
        check=_digits_between(9, 12),
        numeric=True,
    ),
)


def check_national_ids(patterns: Mapping[str, str]) -> dict[str, str]:
    """`patterns` (name -> regex) if each can be used, else `InvalidRedactionPattern` naming
    the pattern and what is wrong."""
    for name, pattern in patterns.items():
        if not _NAME.fullmatch(name):
            raise InvalidRedactionPattern(
                f"national-id name {name!r}: use 1-32 lowercase letters, digits or '_'"
            )
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidRedactionPattern(
                f"national-id pattern {name!r} is not a valid regular expression: {exc}"
            ) from None
        try:
            compiled = re.compile(_national_expression(pattern))
        except re.error as exc:  # e.g. a global flag, which only works at the very start
            raise InvalidRedactionPattern(
                f"national-id pattern {name!r} cannot be used: {exc} (use scoped flags: (?i:...))"
            ) from None
        if compiled.match("") or re.match(pattern, ""):
            raise InvalidRedactionPattern(f"national-id pattern {name!r} matches empty text")
    return dict(patterns)


def _national_expression(pattern: str) -> str:
    return f"(?:{pattern}){_END}"


_PARSER: Any = importlib.import_module("re._parser")  # CPython's own, since 3.11
_DIGIT_CATEGORY = "CATEGORY_DIGIT"


def requires_digit(expression: str) -> bool:
    """Whether `expression` can only match in text that has a digit: such a detector is
    skipped for ASCII text without one (text that is not ASCII is always scanned: `\\d`
    matches the digits of every script). Read from the expression's parse by CPython's `re`;
    conservative: False whenever it cannot tell (negative lookarounds, back references and
    conditionals count for nothing, and a parse it does not know means False)."""
    try:
        return _sequence_requires(_PARSER.parse(expression))
    except Exception:  # a bad expression, or a parse of another shape: always scanned
        return False


def _sequence_requires(items: Iterable[tuple[Any, Any]]) -> bool:
    return any(_item_requires(str(op), argument) for op, argument in items)


def _item_requires(op: str, argument: Any) -> bool:
    if op == "LITERAL":
        return bool(48 <= argument <= 57)
    if op == "IN":  # a class: each member a digit (no negation, no other category)
        return all(
            (kind == "LITERAL" and 48 <= member <= 57)
            or (kind == "RANGE" and member[0] >= 48 and member[1] <= 57)
            or (kind == "CATEGORY" and str(member) == _DIGIT_CATEGORY)
            for kind, member in ((str(k), m) for k, m in argument)
        )
    if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
        low, _, body = argument
        return bool(low >= 1 and _sequence_requires(body))
    if op == "SUBPATTERN":
        return _sequence_requires(argument[3])
    if op == "ATOMIC_GROUP":
        return _sequence_requires(argument)
    if op == "ASSERT":  # a lookahead or lookbehind: what it needs, the text has
        return _sequence_requires(argument[1])
    if op == "BRANCH":
        return all(_sequence_requires(branch) for branch in argument[1])
    return False


@dataclass(frozen=True, slots=True)
class _Compiled:
    detector: _Detector
    pattern: re.Pattern[str]
    """Searched in the text itself, or in the lower-cased text for a `lower` detector."""
    any_case: re.Pattern[str]
    """A `lower` detector's expression ignoring case, for text whose lower-cased form has
    another length (non-ASCII): searched in the text itself."""
    not_after: frozenset[str]
    needs_digit: bool
    """Skipped for text without a digit (`requires_digit`, or a `numeric` detector)."""


def _compiled(detector: _Detector) -> _Compiled:
    pattern = re.compile(detector.expression)
    any_case = re.compile(detector.expression, re.IGNORECASE) if detector.lower else pattern
    needs_digit = detector.numeric or requires_digit(detector.expression)
    return _Compiled(detector, pattern, any_case, frozenset(detector.not_after), needs_digit)


class Redactor:
    """The compiled detectors for one configuration. Build once, use for every message.

    Each detector is its own compiled expression, scanned only when its cheap precondition
    holds (an `@` for e-mail addresses, `://` for URL passwords, ...): CPython's `re` skips
    ahead in C only when an expression starts with a literal or a character class, which one
    alternation of every detector cannot (measured: ~700 us per 1 KB message as one
    alternation, a small fraction of that as separate scans; see docs/redaction.md)."""

    def __init__(
        self,
        national_ids: Mapping[str, str] = DEFAULT_NATIONAL_IDS,
        kinds: Iterable[str] = KINDS,
    ) -> None:
        wanted = frozenset(kinds)
        unknown = wanted - set(KINDS)
        if unknown:
            raise InvalidRedactionPattern(
                f"unknown redaction kinds {sorted(unknown)}; known: {', '.join(KINDS)}"
            )
        national = [
            _Detector("national_id", _national_expression(pattern), not_after=_WORD)
            for pattern in check_national_ids(national_ids).values()
        ]
        at = next(i for i, d in enumerate(_DETECTORS) if d.kind == "phone")
        self.kinds = wanted
        self._use(
            [
                _compiled(d)
                for d in (*_DETECTORS[:at], *national, *_DETECTORS[at:])
                if d.kind in wanted
            ]
        )

    def _use(self, detectors: Sequence[_Compiled]) -> None:
        """Scan with `detectors`, in this (priority) order."""
        self._detectors = list(detectors)
        ranked = list(enumerate(self._detectors))
        # The detectors to scan, by what the text has: a digit, 7 digits close together;
        # each with its priority and precondition at hand.
        self._without_digits = [(p, c, c.detector.needs) for p, c in ranked if not c.needs_digit]
        self._without_run = [(p, c, c.detector.needs) for p, c in ranked if not c.detector.numeric]
        self._every = [(p, c, c.detector.needs) for p, c in ranked]

    def redact(self, text: str, *, max_length: int | None = None) -> Redacted:
        """`text` with every finding masked; cut at `max_length` if masking made it longer."""
        lowered = text.lower()
        aligned = text.isascii()  # lowered[i] is text[i] lower-cased
        # Whether the text has a digit at all: cheap for ASCII text (a C-level byte
        # translation; `re` scans `\d` a character at a time); other text may have
        # non-ASCII digits, which `\d` matches too, so it is scanned.
        # The detectors that can match, chosen once per text, not tested one by one.
        if not aligned or len(text.encode().translate(None, _ASCII_DIGITS)) < len(text):
            pool = self._every if _DIGIT_RUN.search(text) else self._without_run
        else:
            pool = self._without_digits
        # (start, priority, mask from, mask to, covers to, kind or None: hidden, not masked)
        hits: list[tuple[int, int, int, int, int, Kind | None]] = []
        for priority, compiled, needs in pool:
            if needs is not None and not needs(text, lowered):
                continue
            detector = compiled.detector
            if not detector.lower:
                search, scanned = compiled.pattern.search, text
            elif aligned:
                search, scanned = compiled.pattern.search, lowered
            else:
                search, scanned = compiled.any_case.search, text
            not_after, anchor = compiled.not_after, detector.anchor
            pos = 0
            while True:
                if anchor is not None:
                    at = text.find(anchor, pos)
                    if at < 0:
                        break
                    pos = max(pos, at - 65)
                match = search(scanned, pos)
                if match is None:
                    break
                first = match.start()
                if first and text[first - 1] in not_after:
                    pos = first + 1
                    continue
                start, end = match.span()
                for group in detector.groups:  # only the secret part of it
                    if match.start(group) >= 0:
                        start, end = match.span(group)
                        break
                accepted = detector.check(text[start:end])
                if accepted is None:
                    if detector.opaque is not None and detector.opaque(match.group()):
                        hits.append((first, priority, first, first, match.end(), None))
                        pos = match.end()
                    else:
                        pos = first + 1
                    continue
                end = start + accepted
                covers = match.end() if detector.groups else end
                hits.append((first, priority, start, end, covers, detector.kind))
                pos = max(covers, first + 1)
        if not hits:
            return Redacted(text)
        hits.sort()
        pieces: list[str] = []
        counts: Counter[str] = Counter()
        mask_spans: list[tuple[int, int]] = []  # in the output
        size = copied = covered = 0
        for first, _, start, end, covers, kind in hits:
            if first < covered:
                continue  # overlaps an earlier (or higher-priority) finding
            covered = covers
            if kind is None:
                continue
            pieces.append(text[copied:start])
            size += start - copied
            replacement = mask(kind)
            pieces.append(replacement)
            mask_spans.append((size, size + len(replacement)))
            size += len(replacement)
            copied = end
            counts[kind] += 1
        if not counts:
            return Redacted(text)
        pieces.append(text[copied:])
        masked = "".join(pieces)
        findings = tuple(Finding(k, counts[k]) for k in KINDS if counts[k])
        if max_length is None or len(masked) <= max_length:
            return Redacted(masked, findings)
        cut = max_length
        for begin, finish in mask_spans:
            if begin < cut < finish:
                cut = begin if begin > 0 else cut
                break
        return Redacted(masked[:cut], findings, truncated=True)


@functools.cache
def redactor(national_ids: tuple[tuple[str, str], ...], kinds: tuple[str, ...]) -> Redactor:
    """The process's one compiled `Redactor` for this configuration (compiled on first use)."""
    return Redactor(dict(national_ids), kinds)
