"""Scrape a kvfs mount's /metrics while a workload runs, and draw the result as SVG.

    python docs/metrics-scrape.py http://127.0.0.1:9750/metrics docs/metrics-scrape.svg \
        --workload /kvcache --seconds 90

Made docs/metrics-scrape.svg (shown in docs/OPERATIONS.md). The workload, when
given a mount, writes 8 MiB files into a few sessions, reads them back and
removes some, as an engine saving and loading KV would. The plot shows what a
dashboard computes from the same series: write and read throughput, the p50
and p99 latency of the commit at close (flush) and of open, the store's use.
"""

import argparse
import os
import threading
import time
import urllib.request
from xml.sax.saxutils import escape

from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def workload(mount: str, stop: threading.Event) -> None:
    block = os.urandom(8 << 20)
    i = 0
    while not stop.is_set():
        session = os.path.join(mount, f"chat-{i % 6}")
        os.makedirs(session, exist_ok=True)
        path = os.path.join(session, f"layer{i % 32:02d}")
        with open(path, "wb") as f:
            f.write(block)
        with open(path, "rb") as f:
            f.read()
        if i % 7 == 6:
            os.unlink(path)
        i += 1
        time.sleep(0.05 + 0.25 * (1 + ((i // 40) % 2)))  # bursts, then calmer


def quantile(q: float, before: dict, after: dict, op: str) -> float | None:
    """histogram_quantile over the interval between two scrapes, as PromQL does it."""
    buckets = []
    for (name, labels), v in after.items():
        d = dict(labels)
        if name == "kvfs_fuse_operation_seconds_bucket" and d.get("operation") == op:
            le = float("inf") if d["le"] == "+Inf" else float(d["le"])
            buckets.append((le, v - before.get((name, labels), 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo, prev = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * (rank - prev) / max(n - prev, 1e-9)
        lo, prev = le, n
    return None


def value(s: dict, name: str, **labels) -> float:
    return s.get((name, tuple(sorted(labels.items()))), 0.0)


def svg(series: list[tuple[str, str, list[tuple[str, list]]]], t: list[float], title: str) -> str:
    """Stacked panels sharing a time axis: (panel title, unit, [(label, values)])."""
    w, ph, left, top = 760, 170, 70, 40
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    height = top + len(series) * (ph + 60) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{height}" fill="white"/>',
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
    ]
    span = max(t[-1], 1e-9)
    for k, (ptitle, unit, lines) in enumerate(series):
        y0 = top + k * (ph + 60) + 20
        vals = [v for _, vs in lines for v in vs if v is not None]
        vmax = max(vals) * 1.1 if vals and max(vals) > 0 else 1.0
        out.append(f'<text x="{left}" y="{y0 - 6}" font-size="13">{escape(ptitle)}</text>')
        out.append(
            f'<rect x="{left}" y="{y0}" width="{w - left - 20}" height="{ph}" '
            'fill="none" stroke="#999"/>'
        )
        for frac in (0, 0.5, 1):
            y = y0 + ph - frac * ph
            out.append(
                f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{vmax * frac:.3g}</text>'
            )
        out.append(
            f'<text x="14" y="{y0 + ph / 2}" transform="rotate(-90 14 {y0 + ph / 2})" '
            f'text-anchor="middle">{escape(unit)}</text>'
        )
        for j, (label, vs) in enumerate(lines):
            pts = " ".join(
                f"{left + (w - left - 20) * ti / span:.1f},{y0 + ph - ph * v / vmax:.1f}"
                for ti, v in zip(t, vs, strict=True)
                if v is not None
            )
            c = colors[j % len(colors)]
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.6"/>')
            # the legend under the time axis: never over the data or the title
            lx = left + 130 * j
            out.append(f'<rect x="{lx}" y="{y0 + ph + 27}" width="14" height="3" fill="{c}"/>')
            out.append(f'<text x="{lx + 18}" y="{y0 + ph + 32}">{escape(label)}</text>')
        for frac in (0, 0.25, 0.5, 0.75, 1):
            x = left + (w - left - 20) * frac
            out.append(
                f'<text x="{x}" y="{y0 + ph + 15}" text-anchor="middle">{span * frac:.0f} s</text>'
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("out")
    ap.add_argument("--workload", metavar="MOUNT")
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--interval", type=float, default=2)
    args = ap.parse_args()
    stop = threading.Event()
    if args.workload:
        threading.Thread(target=workload, args=(args.workload, stop), daemon=True).start()
    t0 = time.monotonic()
    snaps = []
    while time.monotonic() - t0 < args.seconds:
        snaps.append((time.monotonic() - t0, scrape(args.url)))
        time.sleep(args.interval)
    stop.set()
    t, wr, rd, p50, p99, o99, used, cap = [], [], [], [], [], [], [], []
    for (ta, a), (tb, b) in zip(snaps, snaps[1:], strict=False):
        dt = tb - ta
        t.append(tb)
        mib = 1 << 20
        wr.append(
            (value(b, "kvfs_written_bytes_total") - value(a, "kvfs_written_bytes_total")) / dt / mib
        )
        # passthrough reads never reach the daemon, so opens, not bytes, measure reading
        rd.append((value(b, "kvfs_files_read_total") - value(a, "kvfs_files_read_total")) / dt)
        p50.append(_ms(quantile(0.5, a, b, "flush")))
        p99.append(_ms(quantile(0.99, a, b, "flush")))
        o99.append(_ms(quantile(0.99, a, b, "open")))
        used.append(sum(v for (n, _), v in b.items() if n == "kvfs_store_used_bytes") / mib)
        cap.append(sum(v for (n, _), v in b.items() if n == "kvfs_store_capacity_bytes") / mib)
    store = next(
        (dict(lb)["store"] for (n, lb) in snaps[-1][1] if n == "kvfs_store_used_bytes"), ""
    )
    doc = svg(
        [
            (
                "Writes committed and files opened for reading",
                "MiB/s, opens/s",
                [("written MiB/s", wr), ("read opens/s", rd)],
            ),
            (
                "FUSE latency (from kvfs_fuse_operation_seconds)",
                "ms",
                [("flush p50", p50), ("flush p99", p99), ("open p99", o99)],
            ),
            (
                f"Store use: {store} (kvfs_store_used_bytes, _capacity_bytes)",
                "MiB",
                [("used", used), ("capacity", cap)],
            ),
        ],
        [x - t[0] for x in t],
        f"kvfs /metrics scraped every {args.interval:g} s",
    )
    with open(args.out, "w") as f:
        f.write(doc)


def _ms(v):
    return None if v is None else v * 1000


if __name__ == "__main__":
    main()
