"""Kubernetes resource quantities ("500Gi", "1.5T", "2e9") as exact integers of bytes.

The connector's capacity_bytes wants a number; the CRD accepts the quantity syntax users know from
PVC sizes. Decimal arithmetic keeps "1.5Gi" exact.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?)$")


class QuantityError(ValueError):
    """Not a Kubernetes quantity; the message quotes the text."""


def parse_bytes(text: str | int) -> int:
    """`text` as a whole number of bytes (rounded up, as the API server rounds storage sizes)."""
    if isinstance(text, int):
        return text
    match = _QUANTITY.match(text.strip())
    if not match:
        raise QuantityError(f"{text!r} is not a quantity (expected e.g. 500Gi, 1T, 2e9)")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number)
        if exponent:
            value *= Decimal(10) ** int(exponent[1:])
        elif suffix == "m":
            value /= 1000
        else:
            value *= _SUFFIXES[suffix or ""]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise QuantityError(f"{text!r} is not a quantity") from exc
    whole = int(value.to_integral_value(rounding="ROUND_CEILING"))
    if whole < 0:
        raise QuantityError(f"{text!r} is negative")
    return whole
