//! Two test "hosts": network namespaces joined by a veth pair (iproute2's
//! `ip netns`, `ip link`), optionally rate-limited with `tc`. Each pair has
//! unique names and its own /24, and is deleted when dropped, also when
//! the test panics.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::vmm::{Vmm, binary};

/// Two namespaces, `a` (10.x.y.1) and `b` (10.x.y.2), joined by a veth pair.
#[derive(Debug)]
pub struct NetPair {
    /// The namespaces.
    pub ns: [String; 2],
    /// Their interfaces.
    pub dev: [String; 2],
    /// Their addresses.
    pub ip: [String; 2],
}

/// Runs `ip ARGS`, returning stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("cannot run {cmd} (install iproute2): {e}"))?;
    if out.status.success() { Ok(()) } else { Err(format!("`{cmd} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())) }
}

impl NetPair {
    /// Creates the pair.
    ///
    /// # Panics
    /// When `ip` fails (the tests run as root; iproute2 must be installed).
    #[must_use]
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n}", pid % 0xffff);
        let pair = NetPair {
            ns: [format!("mvt-{tag}-a"), format!("mvt-{tag}-b")],
            // Interface names are at most 15 bytes.
            dev: [format!("mva{tag}"), format!("mvb{tag}")],
            ip: [format!("10.{}.{}.1", 100 + pid % 100, n % 250), format!("10.{}.{}.2", 100 + pid % 100, n % 250)],
        };
        // The guard exists from here, so a failure below still cleans up.
        let made = (|| {
            for ns in &pair.ns {
                ip(&["netns", "add", ns])?;
            }
            ip(&["link", "add", &pair.dev[0], "type", "veth", "peer", "name", &pair.dev[1]])?;
            for i in 0..2 {
                ip(&["link", "set", &pair.dev[i], "netns", &pair.ns[i]])?;
                ip(&["-n", &pair.ns[i], "addr", "add", &format!("{}/24", pair.ip[i]), "dev", &pair.dev[i]])?;
                ip(&["-n", &pair.ns[i], "link", "set", &pair.dev[i], "up"])?;
                ip(&["-n", &pair.ns[i], "link", "set", "lo", "up"])?;
            }
            Ok::<(), String>(())
        })();
        if let Err(e) = made {
            drop(pair);
            panic!("cannot set up two network namespaces: {e}");
        }
        pair
    }

    /// `vmm ARGS...` inside namespace `side` (0 or 1).
    #[must_use]
    pub fn vmm(&self, side: usize, args: &[&str]) -> Vmm {
        let exe = binary().to_string_lossy().into_owned();
        let mut all = vec!["netns", "exec", self.ns[side].as_str(), exe.as_str()];
        all.extend_from_slice(args);
        Vmm::with_binary(std::path::Path::new("ip"), all)
    }

    /// Limits both directions to `rate` (tc's syntax: `1gbit`, `100mbit`)
    /// with a token bucket (`tc qdisc tbf`; this host's kernel has no
    /// `netem`, so no added delay).
    ///
    /// # Panics
    /// When tc fails.
    pub fn limit_rate(&self, rate: &str) {
        for i in 0..2 {
            run("tc", &["-n", &self.ns[i], "qdisc", "replace", "dev", &self.dev[i], "root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Cuts the link: both ends down. Packets are dropped; neither side's
    /// connection is told (no reset), as with a pulled cable.
    ///
    /// # Panics
    /// When ip fails.
    pub fn cut(&self) {
        for i in 0..2 {
            ip(&["-n", &self.ns[i], "link", "set", &self.dev[i], "down"]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

impl Default for NetPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and with it
        // the peer.
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
