#!/usr/bin/env python3
"""Docker sandboxes: create -> Running and an exec of /bin/true through the control plane, p50,
under --isolation namespaces (no network, unix sockets, egress proxy) beside --isolation none
(the bridge network), in the same run, interleaved. Needs the Docker engine, root, and an image
whose runner is of this tree (scripts/images.sh).

Usage: scripts/bench-docker-network.py [CREATES [EXECS]]
env: AGENTBOX_CONTROLPLANE (default target/release/agentbox-controlplane, else target/debug),
     AGENTBOX_BENCH_IMAGE (default agentbox/python-agent:latest)
"""
import hashlib, json, os, secrets, shutil, statistics, subprocess, sys, tempfile, time, urllib.error, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CP = os.environ.get("AGENTBOX_CONTROLPLANE") or next(
    p for p in (ROOT + "/target/release/agentbox-controlplane", ROOT + "/target/debug/agentbox-controlplane")
    if os.path.exists(p))
IMAGE = os.environ.get("AGENTBOX_BENCH_IMAGE", "agentbox/python-agent:latest")
KEY = "abx_" + secrets.token_hex(16)
DIR = tempfile.mkdtemp(prefix="agentbox-bench-docker-")
NETWORK = "agentbox-bench-" + secrets.token_hex(3)


def start(isolation, scope):
    args = [CP, "--backend", "docker", "--docker-scope", scope, "--docker-network", NETWORK,
            "--isolation", isolation, "--api-keys-file", DIR + "/keys.json",
            "--templates-file", DIR + "/templates.json", "--state-dir", DIR + "/state-" + isolation,
            "--listen", "127.0.0.1:0"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env={"PATH": os.environ["PATH"], "AGENTBOX_LOG": "warn"})
    line = p.stdout.readline().decode()
    return p, int(line.rsplit(":", 1)[1])


def req(port, method, path, body=None):
    r = urllib.request.Request("http://127.0.0.1:%d/api/v1%s" % (port, path), method=method,
                               data=None if body is None else json.dumps(body).encode(),
                               headers={"authorization": "Bearer " + KEY, "content-type": "application/json",
                                        "accept": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=60) as f:
            return json.loads(f.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError("%s %s: %d %s" % (method, path, e.code, e.read().decode()))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(DIR + "/keys.json", "w") as f:
        json.dump({"keys": [{"name": "bench", "admin": True, "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}, f)
    with open(DIR + "/templates.json", "w") as f:
        json.dump({"templates": [{"name": "t", "mode": "code", "image": IMAGE}]}, f)
    cps = {"namespaces": start("namespaces", "bench" + secrets.token_hex(3)),
           "none": start("none", "bench" + secrets.token_hex(3))}
    res = {k: {"create": [], "exec": []} for k in cps}
    try:
        for i in range(n):
            for iso, (_, port) in cps.items():
                t = time.perf_counter()
                s = req(port, "POST", "/sandboxes", {"name": "b%d" % i, "templateRef": {"name": "t"}})
                res[iso]["create"].append(time.perf_counter() - t)
                assert s["status"] == "Running", s
        for _ in range(m):
            for iso, (_, port) in cps.items():
                t = time.perf_counter()
                o = req(port, "POST", "/sandboxes/b0/exec", {"argv": ["/bin/true"]})
                res[iso]["exec"].append(time.perf_counter() - t)
                assert o["exitCode"] == 0, o
        for iso, r in res.items():
            print("%-10s create -> Running p50 %7.1f ms (n=%d)   exec /bin/true p50 %6.2f ms (n=%d)" % (
                iso, statistics.median(r["create"]) * 1e3, n, statistics.median(r["exec"]) * 1e3, m))
        print("exec p50, namespaces / none: %.2fx" % (
            statistics.median(res["namespaces"]["exec"]) / statistics.median(res["none"]["exec"])))
    finally:
        for _, port in cps.values():
            for i in range(n):
                try:
                    req(port, "DELETE", "/sandboxes/b%d" % i)
                except Exception:
                    pass
        for p, _ in cps.values():
            p.terminate()
            p.wait()
        subprocess.run(["docker", "network", "rm", NETWORK], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(DIR, ignore_errors=True)


main()
