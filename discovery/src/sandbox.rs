//! A private network namespace for tests and demos that must not touch the machine's real
//! network: the mDNS daemon joins multicast on every interface that is up when it starts, so
//! restricting it afterwards is too late. Linux only; needs root (`CAP_SYS_ADMIN`) and `ip`
//! (iproute2). Enabled by the `sandbox` feature.

use std::process::Command;

/// Moves the calling thread into a new network namespace with only `lo`, brought up. Threads
/// and processes started from this thread afterwards (a tokio runtime, the mDNS daemon, `ip`)
/// live in it too.
///
/// Returns `Err` with the reason when namespaces cannot be created here (not root, no
/// `CAP_SYS_ADMIN`, no `ip`): the caller must skip, loudly. Panics if the new namespace shows
/// any interface other than `lo`, so a test can never reach a real network.
pub fn enter_private_network_namespace() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET) failed: {e}"))?;
    let ip = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run `ip` (install iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ip(&["link", "set", "lo", "up"])?;
    ip(&["link", "set", "lo", "multicast", "on"])?;
    let links = ip(&["-o", "link", "show"])?;
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .collect();
    assert_eq!(names, ["lo"], "the private namespace must hold only lo");
    Ok(())
}
