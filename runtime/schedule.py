"""Per-scale temperature schedules and the text form users type (``--temperature 1.0:0.8``).

Forms:
  ``T``            constant T at every scale
  ``A:B``          step: A on the early scales, B from scale ``K // 2`` on
  ``A:B@k``        step with the switch at scale index k
  ``linear:A:B``   linear from A at the first scale to B at the last
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

_HELP = "use T, A:B, A:B@k or linear:A:B (for example 1.0, 1.0:0.8, 1.0:0.8@6, linear:1.0:0.8)"
#: Temperatures the float32 graphs divide logits by without overflow (below, sampling is greedy already).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


@dataclass(frozen=True)
class TemperatureSchedule:
    """A temperature per scale; ``kind`` is ``constant``, ``step`` or ``linear``."""

    kind: str
    start: float
    end: float
    switch: int | None = None

    def values(self, num_scales: int) -> tuple[float, ...]:
        """The temperature of each of ``num_scales`` scales, coarse to fine."""
        if self.kind == "constant":
            return (self.start,) * num_scales
        if self.kind == "step":
            k = num_scales // 2 if self.switch is None else self.switch
            if not 0 <= k <= num_scales:
                raise ConfigError(f"temperature switch scale {k} is outside 0..{num_scales}")
            return tuple(self.start if i < k else self.end for i in range(num_scales))
        span = max(num_scales - 1, 1)
        return tuple(self.start + (self.end - self.start) * i / span for i in range(num_scales))

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"{self.start:g}"
        if self.kind == "step":
            at = "" if self.switch is None else f"@{self.switch}"
            return f"{self.start:g}:{self.end:g}{at}"
        return f"linear:{self.start:g}:{self.end:g}"


def _positive(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"temperature {spec!r} has {text!r}, which is not a number; {_HELP}") from None
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ConfigError(f"temperature {spec!r}: every temperature must be a number in "
                          f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (for greedy sampling use top-k 1)")
    return value


def parse_temperature(spec: str | float | TemperatureSchedule) -> TemperatureSchedule:
    """Parse a schedule from its text form (a number or an existing schedule passes through)."""
    if isinstance(spec, TemperatureSchedule):
        return spec
    if isinstance(spec, (int, float)):
        value = _positive(str(spec), str(spec))
        return TemperatureSchedule("constant", value, value)
    text = str(spec).strip().lower()
    if text.startswith("linear:"):
        parts = text.split(":")[1:]
        if len(parts) != 2:
            raise ConfigError(f"temperature {spec!r} is not a schedule; {_HELP}")
        return TemperatureSchedule("linear", _positive(parts[0], spec), _positive(parts[1], spec))
    if ":" in text:
        body, _, at = text.partition("@")
        parts = body.split(":")
        if len(parts) != 2:
            raise ConfigError(f"temperature {spec!r} is not a schedule; {_HELP}")
        switch = None
        if at:
            if not at.isdecimal():  # isdigit() also takes superscripts, which int() refuses
                raise ConfigError(f"temperature {spec!r}: the switch after '@' must be a scale index; {_HELP}")
            switch = int(at)
        return TemperatureSchedule("step", _positive(parts[0], spec), _positive(parts[1], spec), switch)
    value = _positive(text, spec)
    return TemperatureSchedule("constant", value, value)
