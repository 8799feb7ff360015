//! A throwaway single-member etcd on loopback for `cargo xtask demo --cluster`: the tests'
//! harness (`tests/src/etcd.rs`: free ports, a fresh data directory, SIGKILLed and removed on
//! drop, std only), included here as a module so the demo needs no test crate.

use std::{path::Path, process::Command};

#[allow(unreachable_pub, dead_code)]
#[path = "../../tests/src/etcd.rs"]
mod harness;

pub(crate) use harness::{EtcdServer as Etcd, find_etcd};

/// What to tell someone who has no etcd.
pub(crate) const INSTALL_HINT: &str = "etcd is not installed: the cluster demo runs a real etcd \
     server on loopback.\n  Debian/Ubuntu: sudo apt-get install -y etcd-server\n  elsewhere: \
     https://etcd.io/docs/latest/install/ (or point $QUICX_ETCD_BIN at an etcd binary)";

/// `etcd --version`'s first line, for the demo's banner.
pub(crate) fn version(bin: &Path) -> String {
    let mut cmd = Command::new(bin);
    if std::env::consts::ARCH == "aarch64" {
        cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
    }
    cmd.arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version:").trim().to_owned())
        })
        .unwrap_or_else(|| "(unknown version)".into())
}
