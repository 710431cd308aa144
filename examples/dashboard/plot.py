#!/usr/bin/env python3
"""Draws config/dashboard.png: the Grafana dashboard's panels, plotted with
matplotlib from real scrapes.

Starts `quicpush serve` on free loopback ports, scrapes GET /metrics once a
second while a few short `quicpush bench` runs load it (a room fan-out over TCP,
key pushes over QUIC, a steady latency run), then plots the same series the
dashboard in config/grafana-dashboard.json shows: rate() of the counters and
histogram quantiles of the call latency.

    python3 -m venv /tmp/plotvenv && /tmp/plotvenv/bin/pip install matplotlib
    cargo build --release
    /tmp/plotvenv/bin/python examples/dashboard/plot.py [--exe target/release/quicpush]
"""

import argparse
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text):
    """[(name, {labels}, value)] of a Prometheus text scrape."""
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m.group(2) or ""))
        v = m.group(3)
        out.append((m.group(1), labels, float("inf") if v == "+Inf" else float(v)))
    return out


def scrape(url, token):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return parse(r.read().decode())


def series(scrapes, name, by):
    """{label value: [(t, summed value)]} of metric `name` grouped by label `by`."""
    out = {}
    for t, samples in scrapes:
        sums = {}
        for n, labels, v in samples:
            if n == name:
                k = labels.get(by, "") if by else name
                sums[k] = sums.get(k, 0.0) + v
        for k, v in sums.items():
            out.setdefault(k, []).append((t, v))
    return out


def rate(points):
    return [
        (t1, max(0.0, (v1 - v0) / (t1 - t0)))
        for (t0, v0), (t1, v1) in zip(points, points[1:])
        if t1 > t0
    ]


def quantile(buckets, q):
    """histogram_quantile over [(le, cumulative count)], sorted by le."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            inside = c - prev_c
            return prev_le + (le - prev_le) * ((rank - prev_c) / inside if inside else 1.0)
        prev_le, prev_c = le, c
    return prev_le


def latency(scrapes, q):
    """The q quantile of every call in each scrape interval (all methods)."""
    out = []
    prev = None
    for t, samples in scrapes:
        b = {}
        for n, labels, v in samples:
            if n == "quicpush_rpc_duration_seconds_bucket":
                le = float(labels["le"])
                b[le] = b.get(le, 0.0) + v
        if prev is not None:
            diff = sorted((le, v - prev.get(le, 0.0)) for le, v in b.items())
            x = quantile(diff, q)
            if x is not None:
                out.append((t, x * 1e6))
        prev = b
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exe", default="target/release/quicpush")
    ap.add_argument("--out", default="config/dashboard.png")
    args = ap.parse_args()
    exe = os.path.abspath(args.exe)

    tmp = tempfile.mkdtemp(prefix="quicpush-dashboard-")
    client, rpc, http = free_port(), free_port(), free_port()
    config = os.path.join(tmp, "quicpush.toml")
    with open(config, "w") as f:
        f.write(f"""
[client]
tcp_bind = ["127.0.0.1:{client}"]
quic_bind = ["127.0.0.1:{client}"]
heartbeat_timeout = "1h"
max_connections = 1000000
[quic]
idle_timeout = "1h"
[rpc]
bind = ["127.0.0.1:{rpc}"]
[tls]
dir = "{tmp}"
[auth]
secret_file = "{tmp}/token.secret"
[http]
bind = ["127.0.0.1:{http}"]
api_token_file = "{tmp}/api.token"
""")
    log = open(os.path.join(tmp, "server.log"), "w")
    server = subprocess.Popen([exe, "serve", "--config", config], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http}/metrics"
    token = None
    for _ in range(100):
        try:
            token = open(os.path.join(tmp, "api.token")).read().strip()
            scrape(url, token)
            break
        except Exception:
            time.sleep(0.1)
    else:
        server.kill()
        sys.exit(f"the server did not come up; see {tmp}/server.log")

    scrapes = []
    stop = threading.Event()
    t0 = time.monotonic()

    def scraper():
        while not stop.is_set():
            try:
                scrapes.append((time.monotonic() - t0, scrape(url, token)))
            except Exception as e:  # a missed second shows as a gap
                print("scrape failed:", e, file=sys.stderr)
            stop.wait(1.0)

    th = threading.Thread(target=scraper)
    th.start()
    common = [
        "--server-pid", str(server.pid),
        "--client-addr", f"127.0.0.1:{client}",
        "--rpc-addr", f"127.0.0.1:{rpc}",
        "--certs", tmp, "--quiet",
    ]
    runs = [
        ["--scenario", "room", "--transport", "tcp", "--clients", "1000", "--messages", "3000"],
        ["--scenario", "keys", "--transport", "quic", "--clients", "500", "--messages", "100"],
        ["--scenario", "latency", "--transport", "tcp", "--clients", "1000", "--rate", "50000",
         "--duration", "10s"],
        ["--scenario", "room", "--transport", "quic", "--clients", "500", "--messages", "2000"],
    ]
    try:
        time.sleep(2)
        for r in runs:
            print("bench", " ".join(r), flush=True)
            subprocess.run([exe, "bench", *r, *common], check=True, stdout=subprocess.DEVNULL)
            time.sleep(2)
        time.sleep(2)
        stats = subprocess.run(
            [exe, "stats", "--server", f"http://127.0.0.1:{http}", "--token-file",
             os.path.join(tmp, "api.token")],
            check=True, capture_output=True, text=True,
        ).stdout
        print("quicpush stats:\n" + stats)
    finally:
        stop.set()
        th.join()
        server.terminate()
        server.wait(timeout=30)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(13, 8.5))
    fig.suptitle(
        "quicpush — the Grafana dashboard's panels, plotted from /metrics scraped every second "
        "during quicpush bench runs (room/tcp, keys/quic, latency/tcp, room/quic)",
        fontsize=9,
    )

    def draw(ax, title, lines, unit="", zeros=False):
        for label, pts in sorted(lines.items()):
            if pts and (zeros or any(v for _, v in pts)):
                ax.plot([t for t, _ in pts], [v for _, v in pts], label=label, linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_ylabel(unit, fontsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper right")

    rates = lambda name, by: {k: rate(v) for k, v in series(scrapes, name, by).items()}
    draw(axes[0][0], "Connections online", series(scrapes, "quicpush_connections_online", "transport"))
    draw(axes[0][1], "Deliveries /s", rates("quicpush_deliveries_total", "transport"), "frames/s")
    draw(axes[0][2], "Bytes sent /s", {k: [(t, v / 1e6) for t, v in p] for k, p in
                                      rates("quicpush_bytes_sent_total", "transport").items()}, "MB/s")
    draw(axes[1][0], "Pushes by outcome /s", rates("quicpush_pushes_total", "outcome"), "channels/s")
    draw(axes[1][1], "Backend call latency", {"p50": latency(scrapes, 0.5), "p99": latency(scrapes, 0.99)}, "µs")
    draw(axes[1][2], "Backend calls /s by method", rates("quicpush_rpc_duration_seconds_count", "method"), "calls/s")
    draw(axes[2][0], "Queue-full drops /s", {"dropped": rates("quicpush_queue_full_drops_total", None).get(
        "quicpush_queue_full_drops_total", [])}, "pushes/s", zeros=True)
    draw(axes[2][1], "Disconnects /s by reason", rates("quicpush_disconnects_total", "reason"), "/s")
    ax = axes[2][2]
    draw(ax, "History streams (left), rooms (right)",
         {"history streams": series(scrapes, "quicpush_history_streams", None).get("quicpush_history_streams", [])})
    rooms = series(scrapes, "quicpush_rooms", None).get("quicpush_rooms", [])
    right = ax.twinx()
    right.plot([t for t, _ in rooms], [v for _, v in rooms], color="tab:orange", linewidth=1.2, label="rooms")
    right.set_ylim(0, max([v for _, v in rooms] + [1]) * 1.2)
    right.tick_params(labelsize=7)
    right.legend(fontsize=6, loc="lower right")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) from {len(scrapes)} scrapes")


if __name__ == "__main__":
    main()
