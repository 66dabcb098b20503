//! The escape suite's shared parts: the hostile agent, the test host it must not reach, the
//! package index the allowlist lets through, and the counting of what got through. Used by
//! the local suite (tests/isolation.rs) and the Docker one (tests/docker.rs).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const HOST_SECRET: &str = "ghp_escapeSuiteHostSecret0123456789";
pub const CLI_SECRET: &str = "abx_escapeSuiteCliJsonSecret98765";
pub const HOME_SECRET: &str = "home-file-secret-31415926";
pub const VICTIM_SECRET: &str = "victim-workspace-secret-2718281";

/// The hostile agent: stdlib Python, reads its targets as JSON on stdin, prints what it got.
pub const HOSTILE: &str = r#"
import glob, json, os, socket, sys
t = json.load(sys.stdin)
out = {"read": {}, "connect": {}, "unix": {}, "proxy": {}, "write": {}}
for name, path in t["files"].items():
    try:
        with open(path, "rb") as f:
            out["read"][name] = f.read(65536).decode("latin-1")
    except Exception:
        out["read"][name] = None
dump = [json.dumps(dict(os.environ))]
for d in glob.glob("/proc/[0-9]*"):
    for f in ("environ", "cmdline"):
        try:
            dump.append(open(d + "/" + f, "rb").read().decode("latin-1"))
        except Exception:
            pass
for top in ("/run", "/workspace", "/tmp", "/dev/shm", "/etc"):
    for root, dirs, files in os.walk(top):
        for f in files:
            try:
                with open(os.path.join(root, f), "rb") as fh:
                    dump.append(fh.read(65536).decode("latin-1"))
            except Exception:
                pass
# Large (every readable file): left in the workspace for the test to search, not returned.
with open("/workspace/hostile-dump.txt", "w") as f:
    f.write("\n".join(dump))
for name, (host, port) in t["connect"].items():
    try:
        socket.create_connection((host, port), timeout=2).close()
        out["connect"][name] = "connected"
    except Exception as e:
        out["connect"][name] = None
for name, path in t["unix"].items():
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(path)
        out["unix"][name] = "connected"
    except Exception:
        out["unix"][name] = None
for name, (host, port) in t["proxy"].items():
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
        s.sendall(("CONNECT %s:%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (host, port, host)).encode())
        out["proxy"][name] = s.recv(200).split(b"\r\n")[0].decode()
    except Exception as e:
        out["proxy"][name] = "error " + str(e)
for name, path in t["write"].items():
    try:
        with open(path, "w") as f:
            f.write("escaped")
        out["write"][name] = "written"
    except Exception:
        out["write"][name] = None
print(json.dumps(out))
"#;

/// A test host in a network namespace: a veth pair with a private and a link-local address on
/// each side, and `python3 -m http.server` serving `dir` on port 8080 inside.
pub struct TestHost {
    ns: String,
    veth: String,
    pub private: String,
    pub link_local: String,
    server: Child,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

impl TestHost {
    pub fn new(dir: &Path, salt: u32) -> TestHost {
        let n = std::process::id() % 100 * 2 + salt + 20;
        let ns = format!("abx{n}");
        let veth = format!("vabx{n}");
        let peer = format!("vabxp{n}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = Command::new("ip").args(["link", "del", &veth]).status();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", &format!("10.213.{n}.1/24"), "dev", &veth]);
        ip(&["addr", "add", "169.254.213.1/24", "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("10.213.{n}.2/24"), "dev", &peer]);
        inside(&["addr", "add", "169.254.213.2/24", "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "0.0.0.0",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let host = TestHost {
            ns,
            veth,
            private: format!("10.213.{n}.2"),
            link_local: "169.254.213.2".into(),
            server,
        };
        // Up when the host side can fetch from it (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(
            &format!("{}:8080", host.private).parse().unwrap(),
            Duration::from_millis(200),
        )
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the test host's server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A one-module wheel, `agentbox-probe` 1.0, and a PEP 503 index for it under `dir`.
pub fn write_index(dir: &Path) {
    let script = r#"
import base64, hashlib, os, sys, zipfile
d = sys.argv[1]
os.makedirs(d + "/simple/agentbox-probe", exist_ok=True)
os.makedirs(d + "/files", exist_ok=True)
files = {
    "agentbox_probe/__init__.py": b"VALUE = 'served by the test host'\n",
    "agentbox_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: agentbox-probe\nVersion: 1.0\n",
    "agentbox_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = ""
for name, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record += "%s,sha256=%s,%d\n" % (name, digest, len(data))
record += "agentbox_probe-1.0.dist-info/RECORD,,\n"
whl = d + "/files/agentbox_probe-1.0-py3-none-any.whl"
with zipfile.ZipFile(whl, "w") as z:
    for name, data in files.items():
        z.writestr(name, data)
    z.writestr("agentbox_probe-1.0.dist-info/RECORD", record)
with open(d + "/simple/agentbox-probe/index.html", "w") as f:
    f.write('<a href="../../files/agentbox_probe-1.0-py3-none-any.whl">agentbox_probe-1.0-py3-none-any.whl</a>\n')
"#;
    let status = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
}

/// What got through, by the hostile agent's `report` and its `dump` (every environment, /proc
/// file and readable file it found): any of `secrets` read or found, any connection made, any
/// proxy answer but 403, any write outside the workspace.
pub fn leaks(report: &Value, dump: &str, secrets: &[&str]) -> Vec<String> {
    let mut leaks: Vec<String> = Vec::new();
    for (name, content) in report["read"].as_object().unwrap() {
        if let Some(text) = content.as_str() {
            if secrets.iter().any(|s| text.contains(s)) || name == "shadow" && !text.is_empty() {
                leaks.push(format!("read {name}"));
            }
        }
    }
    for (i, s) in secrets.iter().enumerate() {
        if dump.contains(s) {
            leaks.push(format!(
                "secret {i} found in the environment, /proc or a visible file"
            ));
        }
    }
    for kind in ["connect", "unix"] {
        for (name, result) in report[kind].as_object().unwrap() {
            if !result.is_null() {
                leaks.push(format!("{kind} {name}"));
            }
        }
    }
    for (name, line) in report["proxy"].as_object().unwrap() {
        let line = line.as_str().unwrap_or_default();
        if !line.contains(" 403 ") {
            leaks.push(format!("proxy {name}: {line}"));
        }
    }
    for (name, result) in report["write"].as_object().unwrap() {
        if !result.is_null() {
            leaks.push(format!("write {name}"));
        }
    }
    leaks
}
