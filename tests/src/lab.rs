//! Test devices: the lab crate's devices in a temporary directory, stopped when dropped, with
//! failures as panics (tests want to stop at the first surprise).

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::Output;

pub struct Device {
    inner: debfleet_lab::Device,
    _dir: tempfile::TempDir,
}

impl Device {
    /// A fresh device from the cached rootfs, booted.
    pub fn boot(name: &str) -> Device {
        Self::boot_in(name, "debfleet-dev-")
    }

    /// The same, in a directory whose name starts with `prefix` (spaces, shell syntax: a lab
    /// path is a path, never part of a script).
    pub fn boot_in(name: &str, prefix: &str) -> Device {
        let cache = debfleet_lab::cache_dir();
        std::fs::create_dir_all(&cache).unwrap();
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(&cache).unwrap();
        let inner = debfleet_lab::Device::create(name, dir.path()).unwrap_or_else(|e| panic!("booting {name}: {e}"));
        Device { inner, _dir: dir }
    }

    pub fn exec(&self, cmd: &[&str]) -> Output {
        self.inner.exec(cmd)
    }

    /// The installed version of a package, as dpkg sees it (None: not installed).
    pub fn dpkg_version(&self, pkg: &str) -> Option<String> {
        let out = self.exec(&["dpkg-query", "-W", "-f=${Status} ${Version}", pkg]);
        String::from_utf8_lossy(&out.stdout).strip_prefix("install ok installed ").map(str::to_owned)
    }

    /// Runs a command, failing the test when it fails; returns its stdout.
    pub fn ok(&self, cmd: &[&str]) -> String {
        self.inner.ok(cmd).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn put(&self, src: &Path, dest: &str) {
        self.inner.put(src, dest).unwrap()
    }

    pub fn write(&self, dest: &str, text: &str) {
        self.inner.write(dest, text).unwrap()
    }

    pub fn reboot(&mut self) {
        self.inner.reboot().unwrap_or_else(|e| panic!("rebooting {}: {e}", self.inner.name))
    }

    /// Installs the agent's .deb (scripts/build-debs.sh) with `config` as its agent.toml and
    /// points apt at `repo` only, trusting its key; then (re)starts the agent.
    pub fn install_agent(&self, config: &str, repo: &crate::repo::RepoServer) {
        self.put(&crate::own_deb("debfleet-agent"), "/var/tmp/agent.deb");
        self.ok(&["dpkg", "-i", "/var/tmp/agent.deb"]);
        self.write("/etc/debfleet/agent.toml", config);
        self.put(&repo.root.join("public/debfleet-archive-keyring.gpg"), "/etc/apt/keyrings/debfleet.gpg");
        self.write(
            "/etc/apt/sources.list.d/debfleet.list",
            &format!("deb [signed-by=/etc/apt/keyrings/debfleet.gpg] {}/ stable main\n", repo.url()),
        );
        // Only our repository: the device has no route to a Debian mirror in tests.
        let _ = std::fs::remove_file(self.root.join("etc/apt/sources.list.d/debian.sources"));
        self.ok(&["systemctl", "restart", "debfleet-agent"]);
    }
}

impl Deref for Device {
    type Target = debfleet_lab::Device;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for Device {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.inner.power_cut();
    }
}
