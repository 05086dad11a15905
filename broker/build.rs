//! Stamps the git commit the broker is built from into `SLUICE_GIT_COMMIT`
//! (shown by `sluice broker status` and the `sluice_build_info` metric).
//! Outside a git checkout (a source tarball) it is "unknown"; a
//! `SLUICE_GIT_COMMIT` in the build's environment wins.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SLUICE_GIT_COMMIT");
    let commit = std::env::var("SLUICE_GIT_COMMIT").ok().or_else(|| {
        // Rebuild when HEAD moves (a commit, a checkout).
        for file in ["HEAD", "logs/HEAD"] {
            if let Some(path) = git(&["rev-parse", "--git-path", file]) {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    println!(
        "cargo:rustc-env=SLUICE_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
