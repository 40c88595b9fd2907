//! Bad links for tests: a network namespace holding a real Mosquitto, reached from the host
//! (and the lab devices, which share the host's network) over two links. Devices use the first,
//! which the test degrades (delay, jitter, loss) or cuts (every packet lost, as in a dead zone);
//! observers use the second, a veth pair that stays clean, so what the test sees is what the
//! broker holds.
//!
//! The degraded link is a pair of TUN devices (one in the host, one in the namespace) joined by
//! a forwarder in the test process that delays or drops whole IP packets: what `tc netem` does,
//! but in user space, because the kernels this suite runs on are built without `sch_netem`
//! (`CONFIG_NET_SCH_NETEM is not set`). The agent's TCP sees real loss, delay and silence.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::wait_for;

/// What the degraded link does to each packet, both ways.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    pub delay: Duration,
    /// Up to this much more delay, uniformly.
    pub jitter: Duration,
    /// Percent of packets lost.
    pub loss_pct: f64,
    /// Down: every packet is lost.
    pub up: bool,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment { delay: Duration::ZERO, jitter: Duration::ZERO, loss_pct: 0.0, up: true }
    }
}

/// A TUN device (IFF_TUN | IFF_NO_PI) named `name`, in this network namespace.
fn open_tun(name: &str) -> File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").expect("/dev/net/tun");
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    ifr[16..18].copy_from_slice(&(0x0001u16 | 0x1000).to_ne_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes) from the pointer, which is valid.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    assert!(r == 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    f
}

/// Waits up to 200 ms for `f` to be readable.
fn readable(f: &File) -> bool {
    let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 200) > 0 }
}

/// One direction of the link: packets read from `from`, dropped or held, written to `to`.
fn forward(from: Arc<File>, to: Arc<File>, imp: Arc<Mutex<Impairment>>, stop: Arc<AtomicBool>, seed: u64) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    thread::spawn(move || {
        // Delivery in order of arrival, each at its time (no reordering).
        while let Ok((at, pkt)) = rx.recv() {
            let now = Instant::now();
            if at > now {
                thread::sleep(at - now);
            }
            let _ = (&*to).write(&pkt);
        }
    });
    thread::spawn(move || {
        let mut rng = seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::SeqCst) {
            if !readable(&from) {
                continue;
            }
            let n = match (&*from).read(&mut buf) {
                Ok(n) => n,
                Err(_) => return,
            };
            let i = *imp.lock().unwrap();
            if !i.up || (next() % 10_000) as f64 / 100.0 < i.loss_pct {
                continue;
            }
            let jitter = if i.jitter.is_zero() { 0 } else { next() % i.jitter.as_micros() as u64 };
            let at = Instant::now() + i.delay + Duration::from_micros(jitter);
            if tx.send((at, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    });
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("the ip tool (iproute2) is installed");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub struct Netns {
    pub name: String,
    /// The broker's addresses: on the device path, and on the clean path.
    pub device_addr: String,
    pub clean_addr: String,
    impairment: Arc<Mutex<Impairment>>,
    stop: Arc<AtomicBool>,
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
            device_addr: format!("10.213.{x}.{}", y + 2),
            clean_addr: format!("10.214.{x}.{}", y + 2),
            impairment: Arc::new(Mutex::new(Impairment::default())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        // The clean path: a veth pair.
        let peer = format!("{clean_if}p");
        ip(&["link", "add", &clean_if, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &format!("10.214.{x}.{}/30", y + 1), "dev", &clean_if]);
        ip(&["link", "set", &clean_if, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("10.214.{x}.{}/30", y + 2), "dev", &peer]);
        ip(&["-n", &name, "link", "set", &peer, "up"]);
        // The device path: two point-to-point TUN devices and the forwarder between them. The
        // namespace's device is made here and moved there; its file descriptor goes with it.
        let (host_addr, ns_addr) = (format!("10.213.{x}.{}", y + 1), ns.device_addr.clone());
        let peer = format!("{dev_if}p");
        let host_tun = Arc::new(open_tun(&dev_if));
        let ns_tun = Arc::new(open_tun(&peer));
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &host_addr, "peer", &ns_addr, "dev", &dev_if]);
        ip(&["link", "set", &dev_if, "up"]);
        ip(&["-n", &name, "addr", "add", &ns_addr, "peer", &host_addr, "dev", &peer]);
        ip(&["-n", &name, "link", "set", &peer, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let seed = u64::from(tag) << 20 | u64::from(crate::rand_u32());
        forward(host_tun.clone(), ns_tun.clone(), ns.impairment.clone(), ns.stop.clone(), seed);
        forward(ns_tun, host_tun, ns.impairment.clone(), ns.stop.clone(), seed.rotate_left(17));
        ns
    }

    /// Delay (plus up to `jitter` more) and loss on both directions of the device path.
    pub fn impair(&self, delay: Duration, jitter: Duration, loss_pct: f64) {
        let mut i = self.impairment.lock().unwrap();
        (i.delay, i.jitter, i.loss_pct) = (delay, jitter, loss_pct);
    }

    /// Cuts the device path (every packet lost, no error to either end) or restores it.
    pub fn link(&self, up: bool) {
        self.impairment.lock().unwrap().up = up;
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Deleting the namespace deletes its devices; the host's TUN device goes when the
        // forwarder's threads end and close it.
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
        let listeners = format!("listener {port} {}\nlistener {port} {}\n", ns.device_addr, ns.clean_addr);
        std::fs::write(&conf, crate::mosquitto_conf(&listeners)).unwrap();
        let exe = crate::mosquitto_exe();
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
