//! The documentation's examples, run as written: every ```sh block of README.md and docs/*.md
//! preceded by the line `<!-- test: run -->` is run with bash (`-e -o pipefail`), in order, in
//! one fresh directory per file where a real `agentbox up` runs (the binaries under test first
//! on PATH, no AGENTBOX_* variable of the caller). A block passes when it exits 0 and, if it has
//! lines starting with `#> ` (comments to the shell, shown output to the reader), its stdout is
//! exactly those lines. pip finds its packages in a local wheelhouse packed from
//! what is installed here (tests/docs/wheelhouse.py), so `pip install -r requirements.txt` needs
//! no network. How to mark a block: docs/development.md.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{run_with, Up};

/// The marker line, right before a ```sh fence.
const MARKER: &str = "<!-- test: run -->";

#[derive(Debug)]
struct Block {
    /// 1-based line of the fence.
    line: usize,
    text: String,
    /// Its `#> ` lines, each with a newline: the stdout it must print, when any.
    expected: Option<String>,
}

/// The marked blocks of a Markdown text; a marker not followed by a ```sh block is an error.
fn runnable_blocks(markdown: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != MARKER {
            i += 1;
            continue;
        }
        let fence = i + 1;
        if lines.get(fence).map(|l| l.trim_end()) != Some("```sh") {
            return Err(format!(
                "line {}: {MARKER} must be followed by a ```sh line",
                i + 1
            ));
        }
        let mut text = String::new();
        let mut end = fence + 1;
        while end < lines.len() && lines[end].trim_end() != "```" {
            text.push_str(lines[end]);
            text.push('\n');
            end += 1;
        }
        if end == lines.len() {
            return Err(format!("line {}: the block never ends", fence + 1));
        }
        let shown: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#> ").or((l == "#>").then_some("")))
            .collect();
        let expected = (!shown.is_empty()).then(|| shown.join("\n") + "\n");
        blocks.push(Block {
            line: fence + 1,
            text,
            expected,
        });
        i = end + 1;
    }
    Ok(blocks)
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root.join("README.md"));
    docs
}

#[test]
fn the_marker_is_found_and_misuse_is_reported() {
    let md = "text\n<!-- test: run -->\n```sh\necho a\n#> a\n```\n```sh\nnot marked\n```\n";
    let blocks = runnable_blocks(md).unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(
        (blocks[0].line, blocks[0].text.as_str()),
        (3, "echo a\n#> a\n")
    );
    assert_eq!(blocks[0].expected.as_deref(), Some("a\n"));
    assert!(runnable_blocks("<!-- test: run -->\n```python\nx\n```\n").is_err());
    assert!(runnable_blocks("<!-- test: run -->\n```sh\nnever ends\n").is_err());
}

#[test]
fn readme_and_docs_examples_run_as_written() {
    let root = repo_root();
    let wheelhouse = tempfile::tempdir().unwrap();
    let out = run_with(
        {
            let mut c = std::process::Command::new("python3");
            c.arg(root.join("cli/tests/docs/wheelhouse.py"))
                .arg(wheelhouse.path())
                .arg("pydantic");
            c
        },
        None,
        Duration::from_secs(120),
    );
    out.expect_code(0);
    // Readable by the sandbox's own (unprivileged) uid.
    std::fs::set_permissions(
        wheelhouse.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let wheels = wheelhouse.path().to_str().unwrap();
    let templates = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        templates.path(),
        serde_json::json!({"templates": [{
            "name": "default",
            "mode": "agent",
            "env": {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": wheels, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            "readOnlyPaths": [wheels],
        }]})
        .to_string(),
    )
    .unwrap();
    let templates_arg = templates.path().to_str().unwrap();
    let bin_dir = common::bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let mut ran = 0;
    for doc in documents() {
        let name = doc.strip_prefix(&root).unwrap().display().to_string();
        let blocks = runnable_blocks(&std::fs::read_to_string(&doc).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if name == "README.md" {
            assert!(
                blocks.len() >= 2,
                "README.md has lost its runnable examples"
            );
        }
        if blocks.is_empty() {
            continue;
        }
        // The default isolation, as a reader's `agentbox up` has it; pip inside the sandbox
        // finds the wheelhouse, which the template shows it read-only, instead of an index.
        let up = Up::start_with_env(
            &[
                "--isolation",
                "namespaces",
                "--templates-file",
                templates_arg,
            ],
            &[],
        );
        for block in blocks {
            let mut cmd = std::process::Command::new("bash");
            cmd.args(["-e", "-o", "pipefail", "-c", &block.text])
                .current_dir(&up.dir)
                .stdin(std::process::Stdio::null());
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("AGENTBOX_") {
                    cmd.env_remove(key);
                }
            }
            cmd.env("PATH", &path);
            let out = run_with(cmd, None, Duration::from_secs(180));
            assert_eq!(
                out.code(),
                Some(0),
                "{name}:{} failed:\n{}\n{out:?}\nup's stderr:\n{}",
                block.line,
                block.text,
                up.stderr()
            );
            if let Some(expected) = &block.expected {
                assert!(
                    out.stdout_text() == *expected,
                    "{name}:{}: the block printed\n{}\ninstead of its #> lines\n{expected}",
                    block.line,
                    out.stdout_text()
                );
            }
            ran += 1;
        }
        assert!(up.stop().success(), "{name}");
    }
    assert!(ran >= 2, "only {ran} blocks ran");
}
