"""What a lab is: hosts, their access links, and per-pair path settings.

Pure data and parsing, no I/O, so the CLI, the bench and the tests agree on
one meaning of ``--rate 1gbit --rtt 100ms --pair 0,1:rtt=2ms,rate=10gbit``.

Semantics (documented in deploy/wanlab/README.md):

* ``rate`` is a host's access link, shaped in both directions (``up``: what
  the host sends, ``down``: what it receives); ``None`` leaves it unshaped.
* every ordered pair (a, b) has a one-way ``delay`` (half the pair's RTT by
  default), a drop probability ``loss`` and optionally its own ``rate``,
  which replaces the access rate for traffic between those two hosts (two
  hosts in one "data centre" may talk at 10 Gbit/s while their WAN link to
  the others is 1 Gbit/s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
MAX_HOSTS = 200


class SpecError(ValueError):
    """A lab setting that cannot be built (bad syntax, unknown host, out of range)."""


def parse_rate(text: str) -> int:
    """``1gbit``, ``250mbit``, ``1e9`` (bit/s) -> bit/s."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in {"", *_RATE_UNITS}:
        raise SpecError(f"bad rate {text!r} (e.g. 1gbit, 250mbit)")
    bits = int(float(m.group(1)) * _RATE_UNITS.get(m.group(2), 1))
    if bits <= 0:
        raise SpecError(f"rate must be positive: {text!r}")
    return bits


def parse_time(text: str) -> float:
    """``100ms``, ``0.1s``, ``250us``, ``100`` (ms) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in {"", *_TIME_UNITS}:
        raise SpecError(f"bad duration {text!r} (e.g. 100ms, 0.2s)")
    return float(m.group(1)) * _TIME_UNITS.get(m.group(2), 1e-3)


def parse_loss(text: str) -> float:
    """``0.1%`` or ``0.001`` -> probability."""
    t = text.strip()
    try:
        p = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise SpecError(f"bad loss {text!r} (e.g. 0.1%)") from None
    if not 0.0 <= p < 1.0:
        raise SpecError(f"loss must be in [0, 100%): {text!r}")
    return p


@dataclass(frozen=True)
class Path:
    """One direction between two hosts."""

    delay_s: float
    loss: float
    rate_bit: int | None  # None: the access links decide


@dataclass
class LabSpec:
    hosts: int = 4
    rate_bit: int | None = 10**9
    rtt_s: float = 0.1
    loss: float = 0.0
    # Second octet of the 10.x addresses; a lab owns 10.<subnet>.0.0/16.
    subnet: int = 201
    name: str = "wl"
    mtu: int = 65000
    # (a, b) -> overrides for that direction: delay_s, loss, rate_bit.
    paths: dict[tuple[int, int], dict[str, float | int]] = field(default_factory=dict)
    # host -> {"up": bit/s, "down": bit/s}
    access: dict[int, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 2 <= self.hosts <= MAX_HOSTS:
            raise SpecError(f"hosts must be 2..{MAX_HOSTS}, not {self.hosts}")
        if not 1 <= self.subnet <= 254:
            raise SpecError("subnet is the second octet of 10.x.0.0/16: 1..254")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", self.name):
            raise SpecError(f"lab name {self.name!r}: 1-8 lowercase letters/digits")
        if not 1280 <= self.mtu <= 65000:
            raise SpecError("mtu must be 1280..65000")
        if self.rtt_s < 0:
            raise SpecError("rtt must not be negative")

    # -- addresses and names ------------------------------------------------
    def addr(self, host: int) -> str:
        return f"10.{self.subnet}.{host + 1}.2"

    def gateway(self, host: int) -> str:
        return f"10.{self.subnet}.{host + 1}.1"

    @property
    def prefix(self) -> str:
        """Every namespace of this lab starts with it (``down`` matches on it)."""
        return f"wanlab-{self.name}-"

    def host_ns(self, host: int) -> str:
        return f"{self.prefix}h{host}"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}r"

    # -- settings -------------------------------------------------------------
    def path(self, a: int, b: int) -> Path:
        o = self.paths.get((a, b), {})
        rate = o.get("rate_bit")
        return Path(
            delay_s=float(o.get("delay_s", self.rtt_s / 2)),
            loss=float(o.get("loss", self.loss)),
            rate_bit=None if rate is None else int(rate),
        )

    def up_rate(self, host: int) -> int | None:
        return self.access.get(host, {}).get("up", self.rate_bit)

    def down_rate(self, host: int) -> int | None:
        return self.access.get(host, {}).get("down", self.rate_bit)

    def rate(self, a: int, b: int) -> int | None:
        """What the direction a -> b carries: its pair rate, else the tighter access link."""
        pair = self.path(a, b).rate_bit
        if pair is not None:
            return pair
        known = [r for r in (self.up_rate(a), self.down_rate(b)) if r is not None]
        return min(known) if known else None

    def bottleneck_bit(self) -> int | None:
        """Slowest rate of any host-to-host direction (None: nothing is shaped)."""
        rates = [self.rate(a, b) for a in range(self.hosts) for b in range(self.hosts) if a != b]
        known = [r for r in rates if r is not None]
        return min(known) if known else None

    # -- CLI syntax -------------------------------------------------------------
    def _host(self, text: str) -> int:
        try:
            h = int(text)
        except ValueError:
            raise SpecError(f"bad host {text!r}: hosts are numbered 0..{self.hosts - 1}") from None
        if not 0 <= h < self.hosts:
            raise SpecError(f"no host {h}: hosts are numbered 0..{self.hosts - 1}")
        return h

    def add_pair(self, text: str) -> None:
        """``A,B:rtt=2ms,rate=10gbit,loss=0.1%`` (both directions) or
        ``A>B:delay=60ms,rate=100mbit`` (one direction; delay is one-way)."""
        head, _, body = text.partition(":")
        directed = ">" in head
        ends = head.split(">" if directed else ",")
        if len(ends) != 2 or not body:
            raise SpecError(f"bad pair {text!r} (e.g. 0,1:rtt=2ms,rate=10gbit or 0>1:delay=5ms)")
        a, b = self._host(ends[0]), self._host(ends[1])
        if a == b:
            raise SpecError(f"pair {text!r} names one host twice")
        over: dict[str, float | int] = {}
        for item in body.split(","):
            key, _, value = item.partition("=")
            if key == "rtt" and not directed:
                over["delay_s"] = parse_time(value) / 2
            elif key == "delay" and directed:
                over["delay_s"] = parse_time(value)
            elif key == "rate":
                over["rate_bit"] = parse_rate(value)
            elif key == "loss":
                over["loss"] = parse_loss(value)
            else:
                want = "delay, rate, loss" if directed else "rtt, rate, loss"
                raise SpecError(f"bad setting {item!r} in pair {text!r} (one of {want})")
        for d in [(a, b)] if directed else [(a, b), (b, a)]:
            self.paths.setdefault(d, {}).update(over)

    def add_host(self, text: str) -> None:
        """``I:rate=100mbit`` (both directions) or ``I:up=100mbit,down=1gbit``."""
        head, _, body = text.partition(":")
        h = self._host(head)
        for item in body.split(","):
            key, _, value = item.partition("=")
            if key not in {"rate", "up", "down"}:
                raise SpecError(f"bad setting {item!r} in host {text!r} (rate, up or down)")
            for k in ("up", "down") if key == "rate" else (key,):
                self.access.setdefault(h, {})[k] = parse_rate(value)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "hosts": self.hosts,
            "rate_bit": self.rate_bit,
            "rtt_s": self.rtt_s,
            "loss": self.loss,
            "subnet": self.subnet,
            "mtu": self.mtu,
            "paths": [[a, b, o] for (a, b), o in sorted(self.paths.items())],
            "access": {str(h): v for h, v in self.access.items()},
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> LabSpec:
        paths = obj.get("paths", [])
        access = obj.get("access", {})
        assert isinstance(paths, list) and isinstance(access, dict)
        spec = cls(
            hosts=int(obj["hosts"]),  # type: ignore[call-overload]
            rate_bit=None if obj.get("rate_bit") is None else int(obj["rate_bit"]),  # type: ignore[call-overload]
            rtt_s=float(obj["rtt_s"]),  # type: ignore[arg-type]
            loss=float(obj.get("loss", 0.0)),  # type: ignore[arg-type]
            subnet=int(obj["subnet"]),  # type: ignore[call-overload]
            name=str(obj["name"]),
            mtu=int(obj["mtu"]),  # type: ignore[call-overload]
        )
        spec.paths = {(int(a), int(b)): dict(o) for a, b, o in paths}
        spec.access = {int(h): dict(v) for h, v in access.items()}
        return spec
