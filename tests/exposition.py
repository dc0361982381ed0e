"""A strict reader of the Prometheus text format (0.0.4), for tests: it fails on anything
the format does not allow, so a test that reads /metrics with it also checks the format."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

Sample = tuple[str, frozenset[tuple[str, str]]]


def _labels(text: str) -> frozenset[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad labels at {text[pos:]!r}"
        value = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group()], m[2])
        out.append((m[1], value))
        pos = m.end()
    return frozenset(out)


def parse(text: str) -> tuple[dict[str, str], dict[Sample, float]]:
    """TYPE per family, and every sample; fails on anything the format does not allow."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[Sample, float] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            assert name not in types, f"TYPE {name} twice"
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", m[1])
        assert m[1] in types or family in types, f"sample {m[1]} before its TYPE"
        key = (m[1], _labels(m[3] or ""))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(m[4])
    return types, samples


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def family(samples: dict[Sample, float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every series of one sample name: labels -> value."""
    return {labels: v for (n, labels), v in samples.items() if n == name}
