//! Installed state from dpkg's own database (`status` in the admin directory).

use std::collections::BTreeMap;
use std::path::Path;

use debfleet_protocol::units::valid_unit_name;
use debfleet_protocol::PackageState;

/// Looks up `wanted` packages in a dpkg status file's text. Packages dpkg does not know are
/// reported `not-installed`.
pub fn packages_state(status_text: &str, wanted: &[String]) -> BTreeMap<String, PackageState> {
    let mut found = BTreeMap::new();
    for para in status_text.split("\n\n") {
        let mut name = None;
        let (mut version, mut arch, mut status) = (None, None, None);
        for line in para.lines() {
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k {
                "Package" => name = Some(v),
                "Version" => version = Some(v.to_owned()),
                "Architecture" => arch = Some(v.to_owned()),
                "Status" => status = Some(v.to_owned()),
                _ => {}
            }
        }
        let (Some(name), Some(status)) = (name, status) else {
            continue;
        };
        if !wanted.iter().any(|w| w == name) {
            continue;
        }
        // Status is "want flag state", e.g. "install ok installed" or "hold ok installed".
        let mut words = status.split_whitespace();
        let want = words.next().unwrap_or("");
        let state = words.nth(1).unwrap_or("unknown").to_owned();
        let installed = state != "not-installed" && state != "config-files";
        found.insert(
            name.to_owned(),
            PackageState {
                version: if installed { version } else { None },
                arch: if installed { arch } else { None },
                status: state,
                held: want == "hold",
            },
        );
    }
    for w in wanted {
        found.entry(w.clone()).or_insert_with(|| PackageState {
            version: None,
            arch: None,
            status: "not-installed".into(),
            held: false,
        });
    }
    found
}

/// Every installed package and its version, from dpkg's status file.
pub fn installed_versions(admindir: &Path) -> BTreeMap<String, String> {
    installed_versions_in(&std::fs::read_to_string(admindir.join("status")).unwrap_or_default())
}

fn installed_versions_in(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for para in text.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package:") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Version:") {
                version = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Status:") {
                let state = v.split_whitespace().nth(2).unwrap_or("");
                installed = state != "not-installed" && state != "config-files";
            }
        }
        if let (Some(n), Some(v), true) = (name, version, installed) {
            out.insert(n, v);
        }
    }
    out
}

pub fn read_packages_state(admindir: &Path, wanted: &[String]) -> BTreeMap<String, PackageState> {
    let text = std::fs::read_to_string(admindir.join("status")).unwrap_or_default();
    packages_state(&text, wanted)
}

/// dpkg's database, read once per change rather than once per question: dpkg replaces
/// `status` by rename, so the file's identity (device, inode, size, modification time) tells
/// whether the text held is current. Shared by the agent's core and its jobs.
pub struct Database {
    admindir: std::path::PathBuf,
    cached: std::sync::Mutex<Option<(Stamp, std::sync::Arc<str>)>>,
}

type Stamp = (u64, u64, u64, i64, i64);

impl Database {
    pub fn new(admindir: &Path) -> Database {
        Database { admindir: admindir.to_owned(), cached: std::sync::Mutex::new(None) }
    }

    pub fn admindir(&self) -> &Path {
        &self.admindir
    }

    /// The status file's text, read again only when it changed.
    pub fn status(&self) -> std::sync::Arc<str> {
        use std::os::unix::fs::MetadataExt;
        let path = self.admindir.join("status");
        let stamp = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(now), Some((then, text))) = (stamp, cached.as_ref()) {
            if now == *then {
                return text.clone();
            }
        }
        let text: std::sync::Arc<str> = std::fs::read_to_string(&path).unwrap_or_default().into();
        *cached = stamp.map(|s| (s, text.clone()));
        text
    }

    pub fn packages_state(&self, wanted: &[String]) -> BTreeMap<String, PackageState> {
        packages_state(&self.status(), wanted)
    }

    pub fn installed_versions(&self) -> BTreeMap<String, String> {
        installed_versions_in(&self.status())
    }

    pub fn package_units(&self, name: &str) -> Vec<String> {
        package_units_in(&self.admindir, &self.status(), name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Package: bash\nStatus: install ok installed\nPriority: required\nVersion: 5.2.15-2+b2\nArchitecture: amd64\nDescription: shell\n multi\n line\n\nPackage: old\nStatus: deinstall ok config-files\nVersion: 1.0\nArchitecture: all\n\nPackage: pinned\nStatus: hold ok installed\nVersion: 2:1.0~rc1\nArchitecture: arm64\n";

    #[test]
    fn the_database_is_read_again_only_when_dpkg_replaced_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("status"), STATUS).unwrap();
        let db = Database::new(dir.path());
        let first = db.status();
        assert!(std::sync::Arc::ptr_eq(&first, &db.status()), "unchanged: the same text");
        // dpkg writes status-new and renames it over status.
        std::fs::write(dir.path().join("status-new"), "Package: fresh\nStatus: install ok installed\nVersion: 1\n")
            .unwrap();
        std::fs::rename(dir.path().join("status-new"), dir.path().join("status")).unwrap();
        assert_eq!(db.installed_versions().keys().collect::<Vec<_>>(), ["fresh"]);
    }

    #[test]
    fn reads_installed_held_and_missing() {
        let wanted = ["bash", "old", "pinned", "absent"].map(String::from);
        let s = packages_state(STATUS, &wanted);
        assert_eq!(s["bash"].version.as_deref(), Some("5.2.15-2+b2"));
        assert_eq!(s["bash"].status, "installed");
        assert!(!s["bash"].held);
        assert_eq!(s["old"].status, "config-files");
        assert_eq!(s["old"].version, None);
        assert!(s["pinned"].held);
        assert_eq!(s["pinned"].arch.as_deref(), Some("arm64"));
        assert_eq!(s["absent"].status, "not-installed");
        assert_eq!(s.len(), 4);
    }
}

/// The systemd units a package owns: its `X-Debfleet-Units` control field (kept by dpkg in its
/// status database) and the unit files in its file list.
pub fn package_units(admindir: &Path, name: &str) -> Vec<String> {
    package_units_in(admindir, &std::fs::read_to_string(admindir.join("status")).unwrap_or_default(), name)
}

fn package_units_in(admindir: &Path, status: &str, name: &str) -> Vec<String> {
    let mut units = Vec::new();
    let mut arch = None;
    for para in status.split("\n\n") {
        if !para.lines().any(|l| l.strip_prefix("Package:").is_some_and(|v| v.trim() == name)) {
            continue;
        }
        for l in para.lines() {
            if let Some(v) = l.strip_prefix("X-Debfleet-Units:") {
                units.extend(v.split_whitespace().filter(|u| valid_unit_name(u)).map(str::to_owned));
            } else if let Some(v) = l.strip_prefix("Architecture:") {
                arch = Some(v.trim().to_owned());
            }
        }
    }
    // dpkg names the list of a `Multi-Arch: same` package NAME:ARCH.list, with Debian's
    // architecture name (amd64, not x86_64).
    let arch = arch.unwrap_or_else(|| debfleet_protocol::debian::host_arch().to_owned());
    let info = admindir.join("info");
    let list = std::fs::read_to_string(info.join(format!("{name}.list")))
        .or_else(|_| std::fs::read_to_string(info.join(format!("{name}:{arch}.list"))))
        .unwrap_or_default();
    for path in list.lines() {
        let in_unit_dir = ["/lib/systemd/system/", "/usr/lib/systemd/system/", "/etc/systemd/system/"]
            .iter()
            .any(|d| path.strip_prefix(d).is_some_and(|rest| !rest.contains('/')));
        let file = path.rsplit('/').next().unwrap_or(path);
        // Templates (`getty@.service`) are not units that run by themselves.
        if in_unit_dir && valid_unit_name(file) && !file.contains('@') {
            units.push(file.to_owned());
        }
    }
    units.sort();
    units.dedup();
    units
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn units_from_the_control_field_and_the_file_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("info")).unwrap();
        std::fs::write(
            dir.path().join("status"),
            "Package: led\nStatus: install ok installed\nVersion: 1\nX-Debfleet-Units: led.service led-watch.timer\n\nPackage: other\nStatus: install ok installed\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("info/led.list"), "/usr/bin/led\n/lib/systemd/system/led.service\n/lib/systemd/system/led-extra.socket\n/lib/systemd/system/getty@.service\n").unwrap();
        assert_eq!(package_units(dir.path(), "led"), ["led-extra.socket", "led-watch.timer", "led.service"]);
    }

    #[test]
    fn units_of_a_multi_arch_same_package_are_found_under_its_debian_architecture() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("info")).unwrap();
        std::fs::write(
            dir.path().join("status"),
            "Package: libled1\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\nMulti-Arch: same\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("info/libled1:amd64.list"), "/lib/systemd/system/led-helper.service\n").unwrap();
        assert_eq!(package_units(dir.path(), "libled1"), ["led-helper.service"]);
        assert!(package_units(dir.path(), "other").is_empty());
    }
}
