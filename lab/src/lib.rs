//! The fleet lab: real systemd, apt and dpkg in systemd-nspawn containers booted from a
//! debootstrapped Debian rootfs (see shared/design/lab.md for the recipe and its traps). Used by
//! `debfleet lab` and `debfleet demo`, and by the end-to-end tests.
//!
//! The base rootfs is built once and cached under `$DEBFLEET_LAB_CACHE` (default
//! `/var/tmp/debfleet-lab`), keyed on its package list. Each device boots from its own copy, so
//! its state survives a reboot. Devices of `debfleet lab` live under a lab directory
//! (`$DEBFLEET_LAB_DIR`, default `/var/lib/debfleet-lab`) and outlive the command that started
//! them; test devices live in a temporary directory and die with their handle.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SUITE: &str = "bookworm";
/// What a device has besides minbase: what the agent and our packages depend on.
const INCLUDE: &str =
    "systemd,systemd-sysv,dbus,apt,ca-certificates,iproute2,init-system-helpers,libgcc-s1,adduser,liblzma5";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0} failed: {1}")]
    Command(String, String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("device {0} is not running")]
    NotRunning(String),
    #[error("no device named {0}")]
    NoDevice(String),
    #[error("{0}")]
    Timeout(String),
    #[error("device names are [a-z0-9][a-z0-9-]{{0,30}}: {0:?}")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io { path: path.to_owned(), source }
}

/// Host packages the lab needs, with the commands that tell whether they are there.
pub const HOST_PACKAGES: [(&str, &str); 2] = [("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap")];

/// Installs missing host packages when root; otherwise says what is needed.
pub fn ensure_host_packages() -> Result<(), LabError> {
    let missing: Vec<&str> = HOST_PACKAGES.iter().filter(|(cmd, _)| !have(cmd)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::Command(
            "the lab".into(),
            format!(
                "it needs the Debian packages {} and root (systemd-nspawn): run as root, or apt-get install them",
                missing.join(" ")
            ),
        ));
    }
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn have(cmd: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"].iter().any(|d| Path::new(d).join(cmd).exists())
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("DEBFLEET_LAB_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/debfleet-lab".into())
}

fn mirror() -> String {
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default()
        + &std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    sources
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("URIs:").map(|u| u.trim().to_owned()).or_else(|| {
                l.strip_prefix("deb ")
                    .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")).map(String::from))
            })
        })
        .find(|u| !u.contains("security"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

fn run(cmd: &mut Command) -> Result<Output, LabError> {
    let name = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| LabError::Command(name.clone(), e.to_string()))?;
    if !out.status.success() {
        return Err(LabError::Command(
            name,
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        ));
    }
    Ok(out)
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

fn flock(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own; released when the file closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
}

/// The cached base rootfs, built with debootstrap on first use (about a minute).
pub fn base_rootfs() -> Result<PathBuf, LabError> {
    let cache = cache_dir();
    let key = format!("{SUITE}-{:08x}", fnv(INCLUDE));
    let dir = cache.join(format!("rootfs-{key}"));
    std::fs::create_dir_all(&cache).map_err(io(&cache))?;
    let lock_path = cache.join(".lock");
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    flock(&lock);
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let tmp = cache.join(format!("building-{key}"));
        let _ = std::fs::remove_dir_all(&tmp);
        run(Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&tmp)
            .arg(mirror()))?;
        // Smaller and quicker to copy; apt lists come back with `apt-get update` when needed.
        run(Command::new("chroot").arg(&tmp).args(["apt-get", "clean"]))?;
        let lists = tmp.join("var/lib/apt/lists");
        for e in std::fs::read_dir(&lists).map_err(io(&lists))?.flatten() {
            if e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // Each copy gets a fresh machine id at first boot.
        std::fs::write(tmp.join("etc/machine-id"), "").map_err(io(&tmp))?;
        std::fs::write(tmp.join(".complete"), "").map_err(io(&tmp))?;
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    }
    Ok(dir)
}

fn wait<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(LabError::Timeout(format!("timed out after {timeout:?} waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    ["systemd", "unified"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h))
        .filter(|h| h.exists())
        .map(|h| h.join(format!("debfleet-lab-{name}")))
        .collect()
}

/// Removes a cgroup directory and the sub-cgroups the container's systemd made in it, depth
/// first (a cgroup directory can only go once it has no children and no processes).
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 31
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// One device: a directory holding its root filesystem, and, while it runs, its processes.
pub struct Device {
    pub name: String,
    /// The directory with `root/`, `console.log` and the pid file.
    pub dir: PathBuf,
    pub root: PathBuf,
    /// The container's init (systemd), as seen from the host.
    pub pid: i32,
    nspawn_pid: i32,
}

impl Device {
    /// Creates `dir/root` from the base rootfs (if missing) and boots it. The device keeps
    /// running after this process exits; [`Device::poweroff`] or [`Device::power_cut`] stops it.
    pub fn create(name: &str, dir: &Path) -> Result<Device, LabError> {
        if !valid_name(name) {
            return Err(LabError::BadName(name.into()));
        }
        let root = dir.join("root");
        if !root.exists() {
            let base = base_rootfs()?;
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            run(Command::new("cp").arg("-a").arg("--reflink=auto").arg(&base).arg(&root))?;
            std::fs::write(root.join("etc/hostname"), format!("{name}\n")).map_err(io(&root))?;
        }
        let mut d = Device { name: name.to_owned(), dir: dir.to_owned(), root, pid: 0, nspawn_pid: 0 };
        d.start()?;
        Ok(d)
    }

    /// A device started earlier (by this or another process).
    pub fn attach(name: &str, dir: &Path) -> Result<Device, LabError> {
        let read =
            |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|s| s.trim().parse::<i32>().ok()).unwrap_or(0);
        let (nspawn_pid, pid) = (read("nspawn.pid"), read("init.pid"));
        if !dir.join("root").exists() {
            return Err(LabError::NoDevice(name.into()));
        }
        if !alive(nspawn_pid) || !alive(pid) {
            return Err(LabError::NotRunning(name.into()));
        }
        Ok(Device { name: name.into(), dir: dir.into(), root: dir.join("root"), pid, nspawn_pid })
    }

    pub fn is_running(&self) -> bool {
        alive(self.nspawn_pid) && alive(self.pid)
    }

    fn start(&mut self) -> Result<(), LabError> {
        // Leftovers of an earlier device of the same name would put this one in a used cgroup.
        for c in cgroup_dirs(&self.name) {
            remove_cgroup_tree(&c);
        }
        let cgroups: Vec<String> = cgroup_dirs(&self.name).iter().map(|p| p.display().to_string()).collect();
        // nspawn must not run in our own cgroup (lab.md: several devices at once), and must
        // outlive us: its own session, its own cgroup.
        // The paths and the name are arguments, never part of the script: a lab directory with
        // spaces or shell syntax in it stays a path.
        let script =
            "root=$1 name=$2; shift 2; for c in \"$@\"; do mkdir -p \"$c\" && echo $$ > \"$c/cgroup.procs\"; done; \
                      exec systemd-nspawn -q -D \"$root\" --boot --register=no --keep-unit --machine=\"lab-$name\"";
        let log_path = self.dir.join("console.log");
        let log = std::fs::File::create(&log_path).map_err(io(&log_path))?;
        let child = Command::new("setsid")
            .args(["bash", "-c", script, "lab-device"])
            .arg(&self.root)
            .arg(&self.name)
            .args(&cgroups)
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io(&log_path))?)
            .stderr(log)
            .spawn()
            .map_err(|e| LabError::Command("systemd-nspawn".into(), e.to_string()))?;
        self.nspawn_pid = child.id() as i32;
        // The child is reaped by whoever outlives it; we only keep its pid.
        std::mem::forget(child);
        let nspawn = self.nspawn_pid;
        self.pid = wait(Duration::from_secs(30), "the device's systemd", || {
            let out = Command::new("pgrep").args(["-P", &nspawn.to_string(), "-x", "systemd"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        })?;
        std::fs::write(self.dir.join("nspawn.pid"), self.nspawn_pid.to_string()).map_err(io(&self.dir))?;
        std::fs::write(self.dir.join("init.pid"), self.pid.to_string()).map_err(io(&self.dir))?;
        // systemd is PID 1 a moment before its bus is up; until then systemctl cannot answer, and
        // says so as "offline" (seen once in a full suite run: the boot was taken as failed).
        // `--wait` alone would wait forever on a boot that never settles; bound it.
        let out = wait(Duration::from_secs(120), "the device's systemd to answer", || {
            let out = self.exec(&["timeout", "90", "systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (!state.is_empty() && state != "offline").then_some(out)
        })?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if state != "running" && state != "degraded" {
            let log = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
            return Err(LabError::Command(
                format!("booting {}", self.name),
                format!("it came up {state:?}; console:\n{log}"),
            ));
        }
        Ok(())
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
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| Output {
                status: Default::default(),
                stdout: Vec::new(),
                stderr: e.to_string().into_bytes(),
            })
    }

    /// Like [`Device::exec`], an error when the command fails.
    pub fn ok(&self, cmd: &[&str]) -> Result<String, LabError> {
        let out = self.exec(cmd);
        if !out.status.success() {
            return Err(LabError::Command(
                format!("{}: {}", self.name, cmd.join(" ")),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Puts a host file into the device at `dest` (an absolute path inside). It goes through
    /// the root directory, so mounts inside the device (the /tmp tmpfs) hide it: use /var/tmp.
    pub fn put(&self, src: &Path, dest: &str) -> Result<(), LabError> {
        let target = self.root.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("absolute")).map_err(io(&target))?;
        std::fs::copy(src, &target).map_err(io(&target))?;
        Ok(())
    }

    pub fn write(&self, dest: &str, text: &str) -> Result<(), LabError> {
        let target = self.root.join(dest.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("absolute")).map_err(io(&target))?;
        std::fs::write(&target, text).map_err(io(&target))
    }

    pub fn is_active(&self, unit: &str) -> bool {
        self.exec(&["systemctl", "is-active", "--quiet", unit]).status.success()
    }

    /// A clean poweroff, then boot again from the same root.
    pub fn reboot(&mut self) -> Result<(), LabError> {
        self.poweroff()?;
        self.start()
    }

    /// A clean shutdown (SIGRTMIN+3 to the container's init).
    pub fn poweroff(&mut self) -> Result<(), LabError> {
        if alive(self.pid) {
            // SAFETY: a signal to the container's init, which the lab started.
            unsafe { libc::kill(self.pid, libc::SIGRTMIN() + 3) };
        }
        let nspawn = self.nspawn_pid;
        wait(Duration::from_secs(30), "the device to power off", || (!alive(nspawn) || zombie(nspawn)).then_some(()))?;
        self.cleanup();
        Ok(())
    }

    /// Pulls the plug: the container's init, and with it every process of its PID namespace,
    /// and nspawn die at once. (Killing only nspawn would leave the container running,
    /// re-parented to the host's init.)
    pub fn power_cut(&mut self) {
        for pid in [self.pid, self.nspawn_pid] {
            if alive(pid) {
                // SAFETY: SIGKILL to processes the lab started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let nspawn = self.nspawn_pid;
        let _ = wait(Duration::from_secs(10), "the device to die", || (!alive(nspawn) || zombie(nspawn)).then_some(()));
        // The container's processes die with its PID namespace; give them a moment.
        std::thread::sleep(Duration::from_millis(300));
        self.cleanup();
    }

    fn cleanup(&mut self) {
        // Forget the pids: once dead they may be reused by unrelated processes.
        self.pid = 0;
        self.nspawn_pid = 0;
        for c in cgroup_dirs(&self.name) {
            remove_cgroup_tree(&c);
        }
        let _ = std::fs::remove_file(self.dir.join("nspawn.pid"));
        let _ = std::fs::remove_file(self.dir.join("init.pid"));
    }
}

/// A process that exited but was not reaped (our own child, when we are its parent).
fn zombie(pid: i32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a pid; harmless when it is not our child.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    r == pid
}

/// The lab directory of `debfleet lab`: one subdirectory per device.
pub struct Lab {
    pub dir: PathBuf,
}

impl Lab {
    pub fn open() -> Lab {
        let dir =
            std::env::var_os("DEBFLEET_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/lib/debfleet-lab".into());
        Lab { dir }
    }

    pub fn device_dir(&self, name: &str) -> PathBuf {
        self.dir.join("devices").join(name)
    }

    /// Names of all devices, running or not.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("devices"))
            .map(|d| d.flatten().filter_map(|e| e.file_name().to_str().map(String::from)).collect())
            .unwrap_or_default();
        names.sort_by_key(|n| (n.len(), n.clone()));
        names
    }

    pub fn create(&self, name: &str) -> Result<Device, LabError> {
        Device::create(name, &self.device_dir(name))
    }

    pub fn attach(&self, name: &str) -> Result<Device, LabError> {
        Device::attach(name, &self.device_dir(name))
    }

    /// Stops every device and removes everything the lab made.
    pub fn down(&self) -> Vec<String> {
        let mut gone = Vec::new();
        for name in self.names() {
            if let Ok(mut d) = self.attach(&name) {
                d.power_cut();
            }
            for c in cgroup_dirs(&name) {
                remove_cgroup_tree(&c);
            }
            let _ = std::fs::remove_dir_all(self.device_dir(&name));
            gone.push(name);
        }
        gone
    }
}
