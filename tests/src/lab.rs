//! Devices for tests: real systemd, apt and dpkg in systemd-nspawn containers booted from a
//! debootstrapped Debian rootfs (see shared/design/lab.md for the recipe and its traps).
//!
//! The rootfs is built once and cached under `$DEBFLEET_LAB_CACHE` (default
//! `/var/tmp/debfleet-lab`), keyed on the package list; each device boots from its own copy, so
//! state survives a reboot of that device.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::wait_for;

const SUITE: &str = "bookworm";
/// What a device has besides minbase: what the agent and our packages depend on.
const INCLUDE: &str =
    "systemd,systemd-sysv,dbus,apt,ca-certificates,iproute2,init-system-helpers,libgcc-s1,adduser,liblzma5";

fn cache_dir() -> PathBuf {
    std::env::var_os("DEBFLEET_LAB_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/debfleet-lab".into())
}

fn mirror() -> String {
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default()
        + &std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    sources
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("URIs:").map(|u| u.trim().to_owned()).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")).map(String::from))
            })
        })
        .filter(|u| !u.contains("security"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The cached base rootfs, built with debootstrap on first use (about a minute).
pub fn base_rootfs() -> PathBuf {
    let key = format!("{SUITE}-{:08x}", crate::fnv(INCLUDE));
    let dir = cache_dir().join(format!("rootfs-{key}"));
    std::fs::create_dir_all(cache_dir()).unwrap();
    let lock = std::fs::File::create(cache_dir().join(".lock")).unwrap();
    crate::flock(&lock);
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let tmp = cache_dir().join(format!("building-{key}"));
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&tmp)
            .arg(mirror()));
        // Smaller and quicker to copy; apt lists come back with `apt-get update` when needed.
        run(Command::new("chroot").arg(&tmp).args(["apt-get", "clean"]));
        let lists = tmp.join("var/lib/apt/lists");
        for e in std::fs::read_dir(&lists).unwrap().flatten() {
            if e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // Each copy gets a fresh machine id at first boot.
        std::fs::write(tmp.join("etc/machine-id"), "").unwrap();
        std::fs::write(tmp.join(".complete"), "").unwrap();
        std::fs::rename(&tmp, &dir).unwrap();
    }
    dir
}

pub struct Device {
    pub name: String,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
    nspawn: Option<Child>,
    pub pid: i32,
}

fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    ["systemd", "unified"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h))
        .filter(|h| h.exists())
        .map(|h| h.join(format!("debfleet-lab-{name}")))
        .collect()
}

impl Device {
    /// Copies the base rootfs and boots it.
    pub fn boot(name: &str) -> Device {
        let base = base_rootfs();
        let dir = tempfile::Builder::new().prefix("debfleet-dev-").tempdir_in(cache_dir()).unwrap();
        let root = dir.path().join("root");
        run(Command::new("cp").arg("-a").arg("--reflink=auto").arg(&base).arg(&root));
        std::fs::write(root.join("etc/hostname"), format!("{name}\n")).unwrap();
        let mut d = Device { name: name.to_owned(), root, _dir: dir, nspawn: None, pid: 0 };
        d.start();
        d
    }

    fn start(&mut self) {
        let cgroups: Vec<String> = cgroup_dirs(&self.name).iter().map(|p| p.display().to_string()).collect();
        // nspawn must not run in the test's own cgroup (lab.md: several devices at once).
        let script = format!(
            "for c in {cg}; do mkdir -p \"$c\" && echo $$ > \"$c/cgroup.procs\"; done; exec systemd-nspawn -q -D {root} --boot --register=no --keep-unit --machine={name}",
            cg = cgroups.join(" "),
            root = self.root.display(),
            name = format!("lab-{}", self.name),
        );
        let log = std::fs::File::create(self.root.with_file_name("console.log")).unwrap();
        let child = Command::new("setsid")
            .args(["bash", "-c", &script])
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let nspawn_pid = child.id();
        self.nspawn = Some(child);
        self.pid = wait_for(Duration::from_secs(30), "the container's systemd", || {
            let out = Command::new("pgrep").args(["-P", &nspawn_pid.to_string(), "-x", "systemd"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        });
        // systemd is PID 1 a moment before its bus is up; until then systemctl cannot answer.
        let out = wait_for(Duration::from_secs(60), "the device's systemd to answer", || {
            let out = self.exec(&["systemctl", "is-system-running", "--wait"]);
            (!out.stdout.is_empty()).then_some(out)
        });
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            state == "running" || state == "degraded",
            "device {} booted into {state:?} (pid {}): {}\n{}",
            self.name,
            self.pid,
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.root.with_file_name("console.log")).unwrap_or_default()
        );
    }

    /// Runs a command inside the device.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-a", "--"])
            .args([
                "env",
                "-u",
                "DBUS_SYSTEM_BUS_ADDRESS",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "DEBIAN_FRONTEND=noninteractive",
            ])
            .args(cmd)
            .output()
            .unwrap()
    }

    /// Like [`Device::exec`], failing the test when the command fails.
    pub fn ok(&self, cmd: &[&str]) -> String {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "{}: {cmd:?} failed:\n{}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Puts a host file into the device at `dest` (an absolute path inside). It goes through
    /// the root directory, so mounts inside the device (the /tmp tmpfs) hide it: use /var/tmp.
    pub fn put(&self, src: &Path, dest: &str) {
        let target = self.root.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(src, &target).unwrap();
    }

    pub fn write(&self, dest: &str, text: &str) {
        let target = self.root.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, text).unwrap();
    }

    pub fn is_active(&self, unit: &str) -> bool {
        self.exec(&["systemctl", "is-active", "--quiet", unit]).status.success()
    }

    /// A clean poweroff, then boot again from the same root.
    pub fn reboot(&mut self) {
        self.poweroff();
        self.start();
    }

    fn poweroff(&mut self) {
        // SAFETY: signal to the container's init, which we started.
        unsafe { libc::kill(self.pid, libc::SIGRTMIN() + 3) };
        if let Some(mut c) = self.nspawn.take() {
            let done = wait_for(Duration::from_secs(30), "the device to power off", || c.try_wait().unwrap());
            let _ = done;
        }
        for c in cgroup_dirs(&self.name) {
            let _ = std::fs::remove_dir(c);
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut c) = self.nspawn.take() {
            let _ = c.kill();
            let _ = c.wait();
            // The container's processes die with nspawn's namespace; give it a moment.
            std::thread::sleep(Duration::from_millis(300));
        }
        for c in cgroup_dirs(&self.name) {
            let _ = std::fs::remove_dir(c);
        }
    }
}
