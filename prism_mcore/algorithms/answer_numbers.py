"""Numbers with units: `1,234.5 cm`, `\\frac{3}{4}`, `-2/3`, `50\\%`, `x = 7`, `$12`, `30^\\circ`.

Pure stdlib and linear-time regexes, so it runs inside the reward sandbox without importing torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# unit -> (dimension, factor to the dimension's base unit). Counting nouns are labels, not units.
_LENGTH = {"mm": 1e-3, "cm": 1e-2, "dm": 0.1, "m": 1.0, "km": 1e3, "in": 0.0254, "inch": 0.0254, "inches": 0.0254,
           "ft": 0.3048, "foot": 0.3048, "feet": 0.3048, "yd": 0.9144, "yard": 0.9144, "yards": 0.9144,
           "mile": 1609.344, "miles": 1609.344, "meter": 1.0, "meters": 1.0, "metre": 1.0, "metres": 1.0,
           "米": 1.0, "厘米": 1e-2, "毫米": 1e-3, "千米": 1e3, "公里": 1e3}
_MASS = {"mg": 1e-3, "g": 1.0, "kg": 1e3, "t": 1e6, "lb": 453.59237, "lbs": 453.59237, "pound": 453.59237,
         "pounds": 453.59237, "oz": 28.349523125, "gram": 1.0, "grams": 1.0, "克": 1.0, "千克": 1e3, "公斤": 1e3}
_TIME = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "min": 60.0, "minute": 60.0,
         "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
         "day": 86400.0, "days": 86400.0, "week": 604800.0, "weeks": 604800.0, "秒": 1.0, "分钟": 60.0, "小时": 3600.0}
_VOLUME = {"ml": 1e-3, "l": 1.0, "liter": 1.0, "liters": 1.0, "litre": 1.0, "litres": 1.0, "cm^3": 1e-3,
           "cm³": 1e-3, "dm^3": 1.0, "dm³": 1.0, "m^3": 1e3, "m³": 1e3, "升": 1.0, "毫升": 1e-3}
_AREA = {"mm^2": 1e-6, "mm²": 1e-6, "cm^2": 1e-4, "cm²": 1e-4, "m^2": 1.0, "m²": 1.0, "km^2": 1e6, "km²": 1e6}
_OTHER = {"deg": ("angle", 1.0), "degree": ("angle", 1.0), "degrees": ("angle", 1.0), "度": ("angle", 1.0),
          "rad": ("radian", 1.0), "%": ("percent", 1.0), "°c": ("celsius", 1.0), "°f": ("fahrenheit", 1.0),
          "year": ("year", 1.0), "years": ("year", 1.0), "年": ("year", 1.0), "$": ("dollar", 1.0),
          "dollar": ("dollar", 1.0), "dollars": ("dollar", 1.0), "元": ("yuan", 1.0), "yuan": ("yuan", 1.0)}
UNITS: dict[str, tuple[str, float]] = {**{u: ("length", f) for u, f in _LENGTH.items()},
                                       **{u: ("mass", f) for u, f in _MASS.items()},
                                       **{u: ("time", f) for u, f in _TIME.items()},
                                       **{u: ("volume", f) for u, f in _VOLUME.items()},
                                       **{u: ("area", f) for u, f in _AREA.items()}, **_OTHER}
LABELS = {"people", "persons", "person", "students", "student", "items", "item", "pieces", "piece", "times",
          "plates", "plate", "units", "unit", "apples", "cars", "books", "个", "条", "张", "块", "人", "次", "只", "本"}

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_THOUSANDS = re.compile(r"^([+-]?\d{1,3}(?:,\d{3})+)(?=$|[.\s\D])")
_FRAC_TEX = re.compile(rf"^([+-]?)\\frac\{{\s*({_NUM})\s*\}}\{{\s*({_NUM})\s*\}}")
_FRAC_SLASH = re.compile(rf"^({_NUM})\s*/\s*({_NUM})")
_PLAIN = re.compile(_NUM)
_LHS = re.compile(r"^[A-Za-z](?:_\{?\w{1,8}\}?)?\s*=\s*")
_TEX_WRAP = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°)(?!\s*[CcFf]\b)")


@dataclass(frozen=True)
class Quantity:
    value: float
    unit: str | None  # key into UNITS, or None for a bare number / counting label


def _clean(text: str) -> str:
    t = _TEX_WRAP.sub(r" \1 ", text)
    t = t.replace("\\!", "").replace("\\,", "").replace("\\ ", " ").replace("~", " ").replace("\\%", "%")
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\$", "$").replace("，", ",")
    t = _DEGREE.sub(" deg", t)
    return t.strip().rstrip(".").strip()


def parse_quantity(text: str) -> Quantity | None:
    """A number with an optional known unit, or None when the text is anything else (`3x`, `\\sqrt2`)."""
    if len(text) > 200:  # no real quantity is this long; keeps every regex below cheap
        return None
    t = _clean(text)
    t = _LHS.sub("", t, count=1)
    currency = t.startswith("$")
    if currency:
        t = t[1:].lstrip()
    m = _THOUSANDS.match(t)
    if m:
        t = m.group(1).replace(",", "") + t[m.end():]
    m = _FRAC_TEX.match(t)
    if m:
        num, den, rest = float(m.group(2)), float(m.group(3)), t[m.end():]
        value = (-1 if m.group(1) == "-" else 1) * num / den if den else math.nan
    elif (m := _FRAC_SLASH.match(t)) is not None:
        num, den, rest = float(m.group(1)), float(m.group(2)), t[m.end():]
        value = num / den if den else math.nan
    elif (m := _PLAIN.match(t)) is not None:
        value, rest = float(m.group(0)), t[m.end():]
    else:
        return None
    if not math.isfinite(value):
        return None
    unit = _unit(rest)
    if unit is False:
        return None
    if currency:
        if unit is not None:
            return None
        unit = "$"
    return Quantity(value, unit)


def _unit(rest: str) -> str | None | bool:
    """Known unit key, None (no unit or a counting label), or False (trailing text that is not a unit)."""
    u = rest.strip().replace(" ", "").replace("\\", "")
    if not u:
        return None
    u = u.replace("{", "").replace("}", "").replace("^2", "²").replace("^3", "³")
    low = u.lower()
    for key in (u, low, low.replace("²", "^2").replace("³", "^3")):
        if key in UNITS:
            return key
    if low in LABELS:
        return None
    return False


def _close(a: float, b: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-12)


def quantities_equal(pred: Quantity, gold: Quantity, rel_tol: float = 1e-6) -> bool:
    """Relative tolerance; same-dimension units are converted (`50 cm` == `0.5 m`), different
    dimensions never match (`5 kg` != `5 lb`... after conversion, `5 cm` != `5 m`). A unit on only
    one side is ignored, and a percentage also matches its fraction (`50%` == `0.5`)."""
    pu, gu = pred.unit, gold.unit
    if pu is not None and gu is not None:
        (pd, pf), (gd, gf) = UNITS[pu], UNITS[gu]
        return pd == gd and _close(pred.value * pf, gold.value * gf, rel_tol)
    if _close(pred.value, gold.value, rel_tol):
        return True
    if pu == "%":
        return _close(pred.value / 100.0, gold.value, rel_tol)
    if gu == "%":
        return _close(pred.value, gold.value / 100.0, rel_tol)
    return False
