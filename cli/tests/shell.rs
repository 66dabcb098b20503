//! `agentbox shell` driven under tmux (a real terminal): type a command and read its output,
//! Ctrl-C reaches the remote process, the window size follows a resize, the exit code passes
//! through; Ctrl-] detaches, `agentbox ps` lists the shell still running, `--attach` resumes
//! it with what was missed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Up;

struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(dir: &Path) -> Tmux {
        Tmux {
            socket: format!(
                "agentbox-test-{}",
                dir.file_name().unwrap().to_string_lossy()
            ),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux (install it: apt-get install tmux)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn start(&self, session: &str, command: &str) {
        self.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "100",
            "-y",
            "30",
            command,
        ]);
    }

    fn keys(&self, session: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", session];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    fn screen(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", session, "-S", "-200"])
    }

    fn wait_for(&self, session: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen(session);
            if screen.contains(needle) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

fn wait_file(path: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text.trim().to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_shell_under_tmux_types_interrupts_resizes_detaches_and_exits_with_its_code() {
    let up = Up::start(&[]);
    up.create("tty");
    let tmux = Tmux::new(&up.dir);
    let bin = common::bin();
    let dir = up.dir.display().to_string();
    let code = up.dir.join("code");
    tmux.start(
        "a",
        &format!(
            "cd {dir} && {} shell tty -- bash --norc --noprofile; echo \"exit=$?\" > {}; sleep 60",
            bin.display(),
            code.display()
        ),
    );
    // Typed once the remote shell shows its prompt (readline drops earlier typeahead).
    tmux.wait_for("a", "bash-");
    tmux.keys("a", &["echo hello-$((6*7))", "Enter"]);
    tmux.wait_for("a", "hello-42");
    // Ctrl-C interrupts the remote command, not the CLI.
    tmux.keys("a", &["sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux.keys("a", &["C-c"]);
    tmux.keys("a", &["echo after-$((1+1))", "Enter"]);
    tmux.wait_for("a", "after-2");
    // The window size follows.
    tmux.run(&["resize-window", "-t", "a", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(300));
    tmux.keys("a", &["stty size", "Enter"]);
    tmux.wait_for("a", "40 120");
    tmux.keys("a", &["exit 7", "Enter"]);
    assert_eq!(wait_file(&code), "exit=7");

    // Detach with Ctrl-], list, reattach and see what was missed.
    let code_b = up.dir.join("code-b");
    tmux.start(
        "b",
        &format!(
            "cd {dir} && {} shell tty 2> {dir}/err-b; echo \"exit=$?\" > {}; sleep 60",
            bin.display(),
            code_b.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(1000));
    tmux.keys("b", &["echo ready-b", "Enter"]);
    tmux.wait_for("b", "ready-b");
    tmux.keys("b", &["sleep 1; echo later-$((2+3))", "Enter"]);
    tmux.keys("b", &["C-]"]);
    assert_eq!(wait_file(&code_b), "exit=0");
    let err = std::fs::read_to_string(up.dir.join("err-b")).unwrap();
    let id = err
        .split("--attach ")
        .nth(1)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("no reattach hint: {err:?}"));
    let ps = up.run(&["ps", "tty"]);
    ps.expect_code(0);
    let listing = ps.stdout_text();
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("running")),
        "{listing}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let code_c = up.dir.join("code-c");
    tmux.start(
        "c",
        &format!(
            "cd {dir} && {} shell tty --attach {id}; echo \"exit=$?\" > {}; sleep 60",
            bin.display(),
            code_c.display()
        ),
    );
    tmux.wait_for("c", "later-5");
    tmux.keys("c", &["exit 3", "Enter"]);
    assert_eq!(wait_file(&code_c), "exit=3");
    drop(tmux);
    std::thread::sleep(Duration::from_millis(200));
    assert!(up.stop().success());
}
