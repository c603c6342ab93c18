"""Check the scaling model (``benchmarks/scale_model.py``) across two hosts joined by a shaped link.

    sudo .venv/bin/python benchmarks/scale_two_hosts.py                          # rates 0 (unshaped), 1000, 100 Mbit/s
    sudo .venv/bin/python benchmarks/scale_two_hosts.py --rates 100 --topologies 2x3,1x1 --json two.json

Needs root (network namespaces and tc); without it, or without ``ip``, it says why on stderr and exits
0 having measured nothing. The hosts are two network namespaces of this machine (``tests/netns.py``):
host A runs the coordinator and the servers (``--host 0.0.0.0``), host B the workers, over tcp with
CURVE and one key per worker (``benchmarks/multi_host.py``'s setup); each host's egress is limited
with tc ``tbf`` to the rate (0: not shaped). This kernel has neither ``netem`` nor ``fq``, so no delay
can be added: the link's latency is the namespace pair's own, and it is measured.

What is measured, and fed to the model (all in this run):

* **The link**, at each rate: one-way latency, half the median round trip of 64 bytes between a
  process in each namespace (raw pyzmq PAIR over tcp), and bandwidth, the goodput of a bulk transfer
  in messages the size of one reference push (407 kB), each direction: what tbf lets through less
  the TCP/IP and Ethernet headers it also counts. Unshaped, the link has no limit of its own: its
  cost is CPU, already in the per-byte costs, so the model gets no bandwidth there.
* **The per-request and per-byte CPU over this transport**: the reference job on the unshaped pair at
  every ``--calibrate-on`` topology (default: each server count of the check, and 1 or 2 beside a
  single one, with 3 and with 6 workers) and job C (1×1, a 1024-wide hidden layer), two step caps
  each, fitted as ``benchmarks/scale_measure.py`` fits them over ipc (non-negative least squares of
  each role's CPU per step, read by the /proc sampler of ``benchmarks/scale_probe.py`` in the longer
  run's steady window: the namespaces share this machine's /proc); forward+backward and the update
  rule in process. The coordinator's and this process's CPU in those windows is the cores the job
  does not get (``Topology.other_load``).
* **The check**: the reference job (async) on ``--topologies`` at each rate, two step caps (the
  extra steps' examples over their training time; start-up cancels), against
  ``predict(..., Topology(S, W, cores=CORES, split=True, queueing=True, other_load=...))``: one link
  carries every step both ways, both namespaces share this machine's cores, and the rate is the
  closed queueing network's (mean value analysis, ``scale_model.mva``); the least bound alone is
  printed beside it. Unshaped, a topology the costs were fitted to is the calibration's own
  measurement (marked †); the count within 25 % is printed with and without those.
* **The link during the check**, in the extra steps (each run's counters after less before, the
  longer run less the shorter): bytes per worker step each way as tbf passed them (every segment
  with its headers, resends and ACKs; the veth's own count unshaped), how busy each direction was
  (those bytes over the training time, against the tbf rate; the model's figure is the ``push``
  station's utilisation), tbf drops (``tc -s qdisc``) and TCP segments resent (``nstat``
  TcpRetransSegs over TcpOutSegs) per host.

``--tbf-latency-ms`` gives tbf a longer queue (tests/netns.py's is 20 ms: 250 kB at 100 Mbit/s, where
six connections' pushes overflow it), ``--cc`` another TCP congestion control (a namespace may
only pick from net.ipv4.tcp_allowed_congestion_control: reno or bbr here), and ``--costs-from``
reuses an earlier run's calibration, to vary the link without recalibrating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.common import environment  # noqa: E402
from benchmarks.scale_model import Costs, Topology, Workload, predict, step_bytes  # noqa: E402

PROBE_PORT = 7171
PROBE_PERIOD_S, PROBE_TRIM = 0.2, 0.15  # the /proc sampler's period and the steady window's trim (scale_measure's)
EXTRA = ["monitor.dashboard=false"]  # besides scale_measure.QUIET


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (timeout): unwind, so that the namespaces and processes go


# --------------------------------------------------------------------------- the link
def probe_serve(address: str) -> None:
    """The far end of :func:`probe_client`: echoes, swallows a bulk transfer, or sends one."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.RCVTIMEO, 120_000)
    sock.bind(address)
    try:
        while True:
            msg = sock.recv()
            if msg == b"stop":
                break
            if msg.startswith(b"in "):
                for _ in range(int(msg.split()[1])):
                    sock.recv(copy=False)
                sock.send(b"ok")
            elif msg.startswith(b"out "):
                _, n, size = msg.split()
                payload = bytes(int(size))
                for _ in range(int(n)):
                    sock.send(payload, copy=False)
            else:
                sock.send(msg)
    finally:
        sock.close(linger=0)
        ctx.term()


def probe_client(address: str, message_bytes: int, total_bytes: int) -> dict[str, float]:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.RCVTIMEO, 120_000)
    sock.connect(address)
    try:
        ping, rtts = bytes(64), []
        for _ in range(600):
            t0 = time.perf_counter()
            sock.send(ping)
            sock.recv()
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts[100:])
        n = max(4, total_bytes // message_bytes)
        payload = bytes(message_bytes)
        t0 = time.perf_counter()
        sock.send(f"in {n}".encode())
        for _ in range(n):
            sock.send(payload, copy=False)
        sock.recv()
        up = n * message_bytes / (time.perf_counter() - t0 - rtt / 2)
        t0 = time.perf_counter()
        sock.send(f"out {n} {message_bytes}".encode())
        for _ in range(n):
            sock.recv(copy=False)
        down = n * message_bytes / (time.perf_counter() - t0 - rtt / 2)
        sock.send(b"stop")
    finally:
        sock.close(linger=0)
        ctx.term()
    return {"latency_s": rtt / 2, "up_Bps": up, "down_Bps": down, "messages": n, "message_bytes": message_bytes}


def probe_link(hosts, message_bytes: int, total_bytes: int) -> dict[str, float]:
    """Latency and goodput between host b (client) and host a (server)."""
    me = [sys.executable, os.path.abspath(__file__)]
    server = hosts.popen("a", [*me, "--probe-serve", f"tcp://0.0.0.0:{PROBE_PORT}"], stdout=subprocess.DEVNULL)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", hosts.names["b"], *me, "--probe-client", f"tcp://{hosts.addresses['a']}:{PROBE_PORT}",
             "--probe-bytes", f"{message_bytes},{total_bytes}"],
            capture_output=True, text=True, timeout=300, check=True,
        )
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    return json.loads(out.stdout)


# --------------------------------------------------------------------------- what the link did
# TCP counters (nstat) kept per host: segments sent, and every way the kernel counts a resend
TCP_COUNTERS = ("TcpOutSegs", "TcpRetransSegs", "TcpExtTCPLostRetransmit", "TcpExtTCPFastRetrans", "TcpExtTCPSlowStartRetrans",
                "TcpExtTCPTimeouts", "TcpExtTCPLossProbes", "TcpExtTCPSpuriousRTOs", "TcpExtTCPSackRecovery",
                "TcpExtTCPRenoRecovery", "TcpExtTCPDSACKRecv", "TcpExtTCPOFOQueue")


def _json_of(cmd: list[str]) -> Any:
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout)


def counters(hosts) -> dict[str, dict[str, float]]:
    """Per host: what its veth sent and received (``ip -s link``: L2 bytes, ACKs included), what its
    egress qdisc (tbf, when shaped) passed, dropped and held back (``tc -s qdisc``), and :data:`TCP_COUNTERS`."""
    out = {}
    for host, ns in hosts.names.items():
        dev = hosts.devices[host]
        st = _json_of(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev])[0]["stats64"]
        q = next(q for q in _json_of(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev]) if q.get("root", True))
        tcp = _json_of(["ip", "netns", "exec", ns, "nstat", "-asz", "--json"])["kernel"]
        out[host] = {"tx_bytes": st["tx"]["bytes"], "tx_packets": st["tx"]["packets"], "tx_dropped": st["tx"]["dropped"],
                     "rx_bytes": st["rx"]["bytes"], "rx_dropped": st["rx"]["dropped"],
                     **{f"qdisc_{k}": q.get(k, 0) for k in ("bytes", "packets", "drops", "overlimits", "requeues")},
                     **{k: tcp.get(k, 0) for k in TCP_COUNTERS}}
    return out


def _delta(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {h: {k: v - before[h][k] for k, v in after[h].items()} for h in after}


def wire_per_step(m: dict[str, Any], rate_mbit: float) -> dict[str, Any]:
    """The link in the extra steps of :func:`scale_measure.measure` (the longer run less the shorter): bytes on
    the wire per worker step each way (B→A: pushes; A→B: replies), resends, drops, and how busy each
    direction was (its bytes over the extra training time, against the tbf rate)."""
    long, short = m["long"]["wire"], m["short"]["wire"]
    d = {h: {k: long[h][k] - short[h][k] for k in long[h]} for h in long}
    steps, secs = m["long"]["steps"] - m["short"]["steps"], m["long"]["train_s"] - m["short"]["train_s"]
    out = {"steps": steps, "train_s": secs, "counters": d}
    for name, host in (("b_to_a", "b"), ("a_to_b", "a")):
        # shaped: what tbf let through, every segment with its own headers (the veth counts a GSO packet's once)
        sent = d[host]["qdisc_bytes"] if rate_mbit > 0 else d[host]["tx_bytes"]
        out[name] = {
            "bytes_per_step": sent / steps,
            "packets_per_step": (d[host]["qdisc_packets"] if rate_mbit > 0 else d[host]["tx_packets"]) / steps,
            "qdisc_drops": d[host]["qdisc_drops"],
            "retrans_segs": d[host]["TcpRetransSegs"],
            "out_segs": d[host]["TcpOutSegs"],
            "utilisation": sent * 8 / secs / (rate_mbit * 1e6) if rate_mbit > 0 else None,
        }
    return out


# --------------------------------------------------------------------------- jobs on the two hosts
def runner_on(hosts, folder: str):
    """A ``runner`` for :func:`scale_measure.measure`: the job with servers on host a, workers on host b;
    with each run's :func:`counters` (after less before) under ``wire``, and every thread of its
    processes sampled from /proc (``benchmarks/scale_probe.py``: the namespaces share this machine's
    /proc) under ``probe``."""
    from benchmarks.multi_host import run_on_hosts
    from benchmarks.scale_measure import totals
    from benchmarks.scale_probe import Sampler, probed
    from downpour.config import job_to_dict, load_job

    def run(path: str, overrides: list[str]) -> dict[str, Any]:
        before, load, started = counters(hosts), list(os.getloadavg()), []
        with Sampler(lambda: list(started), PROBE_PERIOD_S) as sampler:
            s = run_on_hosts(hosts, job_to_dict(load_job(path, [*overrides, *EXTRA])), folder, timeout_s=600, started=started)
        wire = _delta(counters(hosts), before)
        if s.get("status") != "ok":
            raise RuntimeError(f"{path} {overrides}: {s.get('status')}: {s.get('error')}")
        return {**probed(totals(s), sampler.samples, load, PROBE_TRIM), "wire": wire}

    return run


def calibration_topologies(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``--calibrate-on``, or each server count of the check (and 1 or 2 beside a single one) with 3 and
    with 6 workers: ``scale_measure.calibration_topologies`` for this check."""
    from benchmarks import scale_measure as sm

    return sm.calibration_topologies(argparse.Namespace(calibrate_on=args.calibrate_on, topologies=args.topologies, workers=6))


def calibrate(hosts, folder: str, args: argparse.Namespace) -> tuple[Costs, Workload, dict[str, Any]]:
    from benchmarks import scale_measure as sm
    from benchmarks.scale_probe import load_of

    ref_c, ref_p = sm.mlp_compute_s([128], 32, args.compute_steps)
    big_c, big_p = sm.mlp_compute_s([sm.BIG_HIDDEN], 32, args.compute_steps)
    apply = sm.apply_s_per_param()
    run = runner_on(hosts, folder)
    tops = calibration_topologies(args)
    log(f"calibrating over tcp + CURVE between the namespaces, unshaped: the reference job on "
        f"{', '.join(f'{s}x{w}' for s, w in tops)}; C (1x1, wide) ...")
    jobs = {f"{s}x{w}": sm.measure(sm.MNIST_JOB, s, w, args.steps_short, args.steps_long, runner=run) for s, w in tops}
    c = sm.measure(sm.MNIST_JOB, 1, 1, args.steps_short, args.steps_long, [f"model.args.hidden=[{sm.BIG_HIDDEN}]"], runner=run)
    costs, worker_step = sm.solve_request_costs(list(jobs.values()), c, ref_p, big_p, ref_c, big_c, apply, lat=0.0)
    ref = Workload("reference MLP (784-128-10, batch 32)", ref_p, 32, ref_c, worker_step)
    loads = [load_of(m["long"].get("probe")) for m in jobs.values()]
    # The coordinator's and this process's CPU while a job trains (heartbeats, status, the sampler): cores
    # the workers and servers do not get (Topology.other_load), the calibration jobs' mean.
    background = statistics.mean(x["background"] for x in loads) if loads and all(loads) else 0.0
    return costs, ref, {"jobs": {**jobs, "C": c}, "fitted": list(jobs), "background_cores": background,
                        "compute": {"reference": ref_c, "wide": big_c}}


def check_rate(rate_mbit: float, costs: Costs, ref: Workload, folder: str, args: argparse.Namespace, cal: dict[str, Any]) -> dict[str, Any]:
    """The link's probe and the check of every ``--topologies`` at ``rate_mbit`` (0: unshaped, where the
    calibration's own jobs of this run, if any, are taken as they are: rows marked fitted)."""
    from benchmarks import scale_measure as sm
    from benchmarks.scale_probe import load_of
    from tests.netns import Hosts

    nbytes = int(step_bytes(ref))
    with Hosts() as hosts:
        hosts.add("a")
        hosts.add("b")
        for h in ("a", "b"):
            if rate_mbit > 0:
                hosts.shape(h, rate_mbit)
                if args.tbf_latency_ms is not None:  # the same tbf with a longer queue (tests/netns.py's is 20 ms)
                    subprocess.run(["tc", "-n", hosts.names[h], "qdisc", "replace", "dev", hosts.devices[h], "root", "tbf", "rate",
                                    f"{rate_mbit}mbit", "burst", "256kbit", "latency", f"{args.tbf_latency_ms}ms"],
                                   check=True, capture_output=True, timeout=20)
            if args.cc:
                subprocess.run(["ip", "netns", "exec", hosts.names[h], "sysctl", "-w", f"net.ipv4.tcp_congestion_control={args.cc}"],
                               check=True, capture_output=True, timeout=20)
        total = int(max(8e6, min(64e6, rate_mbit * 1e6 / 8 * 1.5))) if rate_mbit > 0 else int(64e6)
        link = probe_link(hosts, nbytes, total)
        link["settings"] = {k: subprocess.run(["ip", "netns", "exec", hosts.names["a"], "sysctl", "-n", k], capture_output=True,
                                              text=True, timeout=20).stdout.strip()
                            for k in ("net.ipv4.tcp_congestion_control", "net.ipv4.tcp_limit_output_bytes", "net.ipv4.tcp_wmem")}
        link["qdisc"] = _json_of(["tc", "-n", hosts.names["a"], "-j", "qdisc", "show", "dev", hosts.devices["a"]])
        bandwidth = min(link["up_Bps"], link["down_Bps"]) if rate_mbit > 0 else None
        log(f"  {rate_mbit:g} Mbit/s: latency {link['latency_s'] * 1e6:.0f} µs one way, goodput up {link['up_Bps'] * 8e-6:,.0f} / "
            f"down {link['down_Bps'] * 8e-6:,.0f} Mbit/s")
        at = replace(costs, latency_s=link["latency_s"], bandwidth_Bps=bandwidth)
        run, rows = runner_on(hosts, folder), []
        background = cal.get("background_cores", 0.0)
        for s, w in (sm.parse_topology(t) for t in args.topologies.split(",")):
            p = predict(at, ref, Topology(s, w, cores=args.cores, split=True, queueing=True, other_load=background))
            fitted = rate_mbit <= 0 and f"{s}x{w}" in cal.get("fitted", [])
            m = (cal.get("jobs") or {}).get(f"{s}x{w}") if rate_mbit <= 0 else None
            if m is None:
                # step caps: about --seconds of training in the longer run at the predicted rate
                steps_long = int(min(args.steps_long, max(8 * w, p.examples_per_s / ref.batch * args.seconds)))
                m = sm.measure(sm.MNIST_JOB, s, w, max(w, steps_long // 8), steps_long, runner=run)
            wire = wire_per_step(m, rate_mbit)
            rows.append({"servers": s, "workers": w, "measured": m, "predicted": asdict(p), "wire": wire, "fitted": fitted,
                         "load": load_of(m["long"].get("probe"))})
            log(f"  {rate_mbit:g} Mbit/s {s}x{w}: {m['examples_per_s']:,.0f} examples/s measured, {p.examples_per_s:,.0f} "
                f"predicted ({p.bottleneck}; the least bound alone: {p.bounds_examples_per_s:,.0f})")
            for name, v in (("B->A", wire["b_to_a"]), ("A->B", wire["a_to_b"])):
                busy = "" if v["utilisation"] is None else f", busy {100 * v['utilisation']:.0f}% of the tbf rate"
                log(f"    {name}: {v['bytes_per_step']:,.0f} B/step on the wire ({v['bytes_per_step'] / nbytes:.3f}x the model's "
                    f"{nbytes:,}), {v['packets_per_step']:.0f} frames/step, qdisc drops {v['qdisc_drops']}, "
                    f"TCP resent {v['retrans_segs']} of {v['out_segs']} segments{busy}")
    return {"rate_mbit": rate_mbit, "link": link, "bandwidth_Bps": bandwidth, "rows": rows}


def table(results: list[dict[str, Any]], ref: Workload) -> str:
    """The check as a markdown table; † marks the topologies the costs were fitted to (unshaped, this run's
    calibration jobs)."""
    from benchmarks.scale_measure import cpu_per_step

    lines = [
        "| link (tbf) | latency µs one way | goodput Mbit/s up / down | S×W | examples/s measured | predicted (queueing) | error "
        "| least bound | error | bottleneck | link busy B→A / A→B, measured / predicted | wire bytes per step B→A / A→B (× the model's) "
        "| TCP segments resent B→A / A→B | tbf drops per step B→A / A→B | CPU µs/example workers / servers, measured / predicted "
        "| cores others took |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|---|---|---|---:|",
    ]
    for r in results:
        link = r["link"]
        for row in r["rows"]:
            m, p, wire = row["measured"], row["predicted"], row["wire"]
            up, down = wire["b_to_a"], wire["a_to_b"]
            steps = wire["steps"]
            busy = "n/a (unshaped)"
            if up["utilisation"] is not None:
                pb = p["stations"].get("push", {}).get("utilisation")
                busy = f"{100 * up['utilisation']:.0f}% / {100 * down['utilisation']:.0f}%, {100 * pb:.0f}%"
            nbytes, mark = step_bytes(ref), " †" if row.get("fitted") else ""
            lines.append(
                f"| {'unshaped' if r['rate_mbit'] <= 0 else format(r['rate_mbit'], 'g') + ' Mbit/s'} | {link['latency_s'] * 1e6:.0f} | "
                f"{link['up_Bps'] * 8e-6:,.0f} / {link['down_Bps'] * 8e-6:,.0f} | {row['servers']}×{row['workers']}{mark} | "
                f"{m['examples_per_s']:,.0f} | {p['examples_per_s']:,.0f} | "
                f"{100 * (p['examples_per_s'] - m['examples_per_s']) / m['examples_per_s']:+.0f}% | {p['bounds_examples_per_s']:,.0f} | "
                f"{100 * (p['bounds_examples_per_s'] - m['examples_per_s']) / m['examples_per_s']:+.0f}% | {p['bottleneck']} | {busy} | "
                f"{up['bytes_per_step']:,.0f} ({up['bytes_per_step'] / nbytes:.3f}) / {down['bytes_per_step']:,.0f} "
                f"({down['bytes_per_step'] / nbytes:.3f}) | "
                f"{100 * up['retrans_segs'] / max(1, up['out_segs']):.1f}% / "
                f"{100 * down['retrans_segs'] / max(1, down['out_segs']):.1f}% | "
                f"{up['qdisc_drops'] / steps:.1f} / {down['qdisc_drops'] / steps:.1f} | "
                f"{cpu_per_step(m, 'worker') / m['batch'] * 1e6:.1f} / {cpu_per_step(m, 'server') / m['batch'] * 1e6:.1f}, "
                f"{p['worker_cpu_per_step_s'] / ref.batch * 1e6:.1f} / {p['server_cpu_per_step_s'] / ref.batch * 1e6:.1f} | "
                f"{(row.get('load') or {}).get('outside', math.nan):.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0,1000,100", help="link rates, Mbit/s, 0 for unshaped (default 0,1000,100)")
    ap.add_argument("--topologies", default="2x3", help="SxW of the reference job to check at each rate (default 2x3)")
    ap.add_argument("--cores", type=float, default=float(os.cpu_count() or 1), help="cores of this machine (default: all)")
    ap.add_argument("--steps-short", type=int, default=200, help="calibration: steps (all workers) of the shorter run")
    ap.add_argument("--steps-long", type=int, default=1600, help="calibration: of the longer run; the check's cap too")
    ap.add_argument("--seconds", type=float, default=12.0, help="check: the longer run's cap in seconds at the predicted rate")
    ap.add_argument("--compute-steps", type=int, default=200, help="forward+backward steps timed in process")
    ap.add_argument("--json", help="write everything here")
    ap.add_argument("--calibrate-on", metavar="SxW,...", help="the reference job's topologies the request costs are fitted "
                    "to, two server counts at least (default: each server count of --topologies, and 1 or 2 beside a "
                    "single one, with 3 and with 6 workers)")
    ap.add_argument("--costs-from", metavar="JSON", help="take the costs from an earlier run's --json instead of calibrating")
    ap.add_argument("--cc", help="TCP congestion control in both hosts for the check (default: the kernel's, inherited)")
    ap.add_argument("--tbf-latency-ms", type=float, help="the tbf queue in ms of the rate (default: tests/netns.py's 20)")
    ap.add_argument("--probe-serve", help=argparse.SUPPRESS)
    ap.add_argument("--probe-client", help=argparse.SUPPRESS)
    ap.add_argument("--probe-bytes", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_serve:
        probe_serve(args.probe_serve)
        return 0
    if args.probe_client:
        size, total = (int(v) for v in args.probe_bytes.split(","))
        print(json.dumps(probe_client(args.probe_client, size, total)))
        return 0
    from tests.netns import Hosts, unavailable

    if (why := unavailable()) is not None:
        log(f"SKIPPED: the two-host check measured nothing: {why}")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="dp-scale-two-hosts-")
    if args.costs_from:
        with open(args.costs_from) as f:
            earlier = json.load(f)
        costs, ref = Costs(**earlier["costs"]), Workload(**earlier["reference"])
        cal = {"from": args.costs_from, "background_cores": earlier["calibration"].get("background_cores", 0.0)}
    else:
        with Hosts() as hosts:
            hosts.add("a")
            hosts.add("b")
            costs, ref, cal = calibrate(hosts, folder, args)
    log(f"costs over tcp + CURVE: worker {costs.worker_msg_s * 1e6:.1f} µs/request {costs.worker_byte_s * 1e9:.2f} ns/byte, "
        f"server {costs.server_msg_s * 1e6:.1f} µs/request {costs.server_byte_s * 1e9:.2f} ns/byte; "
        f"worker other {ref.worker_step_s * 1e3:.3f} ms/step")
    results = [check_rate(float(r), costs, ref, folder, args, cal) for r in args.rates.split(",")]
    print(
        f"costs over tcp + CURVE between two namespaces: worker_msg_s {costs.worker_msg_s * 1e6:.1f} µs, worker_byte_s "
        f"{costs.worker_byte_s * 1e9:.2f} ns, server_msg_s {costs.server_msg_s * 1e6:.1f} µs, server_byte_s "
        f"{costs.server_byte_s * 1e9:.2f} ns, apply {costs.apply_s_per_param * 1e9:.2f} ns/param; forward+backward "
        f"{ref.compute_s * 1e3:.3f} ms, worker other {ref.worker_step_s * 1e3:.3f} ms/step\n"
    )
    print(table(results, ref))
    rows = [row for r in results for row in r["rows"]]
    within = [row for row in rows if abs(row["predicted"]["examples_per_s"] / row["measured"]["examples_per_s"] - 1) <= 0.25]
    print(f"\nwithin 25 % (queueing): {len(within)} of {len(rows)}; of the {sum(not r.get('fitted') for r in rows)} not "
          f"fitted (no †): {sum(not r.get('fitted') for r in within)}")
    total = time.perf_counter() - t0
    print(f"\n{total:.0f}s in all; {environment()['cpu_model']}; run folder {folder}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment(), "costs": asdict(costs), "reference": asdict(ref), "calibration": cal,
                       "results": results, "total_s": total}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
