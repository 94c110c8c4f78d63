//! The CI smoke as a cargo test: `cargo build --release -p sse-gateway`, then
//! `cargo test --release -p sse-loadtest -- --ignored`. Ignored by default
//! because it needs the gateway's release binary and redis-server.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs target/release/sse-gateway and redis-server"]
fn smoke_every_event_exactly_once() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let gateway = root.join("target/release/sse-gateway");
    assert!(
        gateway.exists(),
        "build it first: cargo build --release -p sse-gateway"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("smoke")
        .arg("--gateway")
        .arg(&gateway)
        .status()
        .expect("run loadtest smoke");
    assert!(status.success(), "loadtest smoke failed");
}
