//! Bad links for tests: a network namespace holding a real Mosquitto, reached from the host
//! (and the lab devices, which share the host's network) over two veth pairs. Devices use the
//! first, whose link the test degrades with `tc netem` (delay, loss) or takes down; observers use
//! the second, which stays clean, so what the test sees is what the broker holds.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::wait_for;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the ip tool (iproute2) is installed");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub struct Netns {
    pub name: String,
    /// Host ends of the device path and of the observer path.
    dev_if: String,
    /// The broker's addresses: on the device path, and on the clean path.
    pub device_addr: String,
    pub clean_addr: String,
}

impl Netns {
    pub fn create() -> Netns {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = (std::process::id() % 1000) * 10 + n % 10;
        let name = format!("dfns{tag}");
        // 10.213.X.Y/30 pairs: X and Y from the tag, so concurrent runs do not collide.
        let (x, y) = ((tag / 60) % 250, (tag % 60) * 4);
        let (dev_if, clean_if) = (format!("dfd{tag}"), format!("dfc{tag}"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            dev_if: dev_if.clone(),
            device_addr: format!("10.213.{x}.{}", y + 2),
            clean_addr: format!("10.214.{x}.{}", y + 2),
        };
        for (host_if, net) in [(&dev_if, "10.213"), (&clean_if, "10.214")] {
            let peer = format!("{host_if}p");
            ip(&["link", "add", host_if, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", &name]);
            ip(&["addr", "add", &format!("{net}.{x}.{}/30", y + 1), "dev", host_if]);
            ip(&["link", "set", host_if, "up"]);
            ip(&["-n", &name, "addr", "add", &format!("{net}.{x}.{}/30", y + 2), "dev", &peer]);
            ip(&["-n", &name, "link", "set", &peer, "up"]);
        }
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ns
    }

    /// `tc netem` on both directions of the device path, e.g. `delay 80ms 20ms loss 2%`.
    pub fn netem(&self, spec: &str) {
        let args: Vec<&str> = spec.split_whitespace().collect();
        for (netns, dev) in [(None, self.dev_if.clone()), (Some(&self.name), format!("{}p", self.dev_if))] {
            let mut cmd = Command::new("tc");
            if let Some(ns) = netns {
                cmd.args(["-n", ns]);
            }
            let out = cmd.args(["qdisc", "replace", "dev", &dev, "root", "netem"]).args(&args).output().unwrap();
            assert!(out.status.success(), "tc netem {spec}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// Takes the device path down (every packet on it is lost) or up again.
    pub fn link(&self, up: bool) {
        ip(&["link", "set", &self.dev_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pairs with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A Mosquitto inside the namespace, listening on both paths.
pub struct NsBroker {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NsBroker {
    pub fn start(ns: &Netns) -> NsBroker {
        let dir = tempfile::tempdir().unwrap();
        let port = 1883;
        let conf = dir.path().join("mosquitto.conf");
        let text = format!(
            "listener {port} {}\nlistener {port} {}\nallow_anonymous true\npersistence false\nuser root\nmax_packet_size {}\nmax_queued_messages 10000\nset_tcp_nodelay true\n",
            ns.device_addr,
            ns.clean_addr,
            debfleet_protocol::limits::BROKER_MAX_PACKET_BYTES
        );
        std::fs::write(&conf, text).unwrap();
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().find(|p| Path::new(p).exists()).unwrap();
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, exe, "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let addr = format!("{}:{port}", ns.clean_addr);
        wait_for(Duration::from_secs(10), "mosquitto in the namespace", || {
            std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).ok()
        });
        NsBroker { port, child, _dir: dir }
    }
}

impl Drop for NsBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
