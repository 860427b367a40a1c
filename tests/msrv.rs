//! The declared minimum Rust (`rust-version` of the workspace) is the real one: no crate locked in
//! Cargo.lock declares a newer one. (Use of std APIs newer than it is clippy's `incompatible_msrv`
//! lint, which CI runs with `-D warnings`.)

use std::process::Command;

/// `1.88` or `1.88.0` as comparable numbers.
fn version(text: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = text
        .split('.')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("`{text}` is not a version")))
        .collect();
    parts.resize(3, 0);
    parts
}

/// This machine's target triple, as rustc names it.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("run rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

#[test]
fn no_locked_crate_needs_a_newer_rust_than_the_workspace_declares() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The crates built on this platform (Linux is the one ferrocotta supports): those of other
    // platforms (crossterm's Windows API crate, say) are in Cargo.lock but never downloaded here,
    // and this test reads only what is on the machine.
    let host = host_triple();
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--filter-platform",
            &host,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = metadata["packages"].as_array().unwrap();
    let members: Vec<&serde_json::Value> = metadata["workspace_members"].as_array().unwrap().iter().collect();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "ferrocotta")
        .and_then(|p| p["rust_version"].as_str())
        .expect("the workspace declares rust-version");
    for p in packages.iter().filter(|p| members.contains(&&p["id"])) {
        assert_eq!(
            p["rust_version"].as_str(),
            Some(ours),
            "{} inherits rust-version",
            p["name"]
        );
    }
    let too_new: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let wants = p["rust_version"].as_str()?;
            (version(wants) > version(ours)).then(|| format!("{} {} needs {wants}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "the workspace declares rust-version {ours}, but: {too_new:?}; raise it (and README's set-up) or pin older crates"
    );
    assert!(packages.len() > 50, "cargo metadata listed the dependencies too");
}
