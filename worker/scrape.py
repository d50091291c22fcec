"""Read a worker's /metrics into plain numbers (used by the demo, the CLI and the tests)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 5.0) -> Samples:
    """All samples at ``url`` keyed by (sample name, sorted label pairs)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample, pairs), value in samples.items() if sample == name and wanted <= set(pairs))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """Samples named ``name`` summed per value of ``label`` (zero values left out)."""
    out: dict[str, float] = {}
    for (sample, pairs), value in samples.items():
        if sample == name and value:
            key = dict(pairs).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out
