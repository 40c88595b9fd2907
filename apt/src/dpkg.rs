//! Installed state from dpkg's own database (`status` in the admin directory).

use std::collections::BTreeMap;
use std::path::Path;

use debfleet_protocol::units::valid_unit_name;
use debfleet_protocol::PackageState;

/// Looks up `wanted` packages in a dpkg status file's text. Packages dpkg does not know are
/// reported `not-installed`.
pub fn packages_state(status_text: &str, wanted: &[String]) -> BTreeMap<String, PackageState> {
    packages_state_in(&parse_status(std::io::Cursor::new(status_text)), wanted)
}

fn packages_state_in(records: &BTreeMap<String, Record>, wanted: &[String]) -> BTreeMap<String, PackageState> {
    wanted
        .iter()
        .map(|w| {
            let state = match records.get(w) {
                Some(r) => {
                    let installed = is_installed(&r.state);
                    PackageState {
                        version: r.version.clone().filter(|_| installed),
                        arch: r.arch.clone().filter(|_| installed),
                        status: r.state.clone(),
                        held: r.held,
                    }
                }
                None => PackageState { version: None, arch: None, status: "not-installed".into(), held: false },
            };
            (w.clone(), state)
        })
        .collect()
}

/// Every installed package and its version, from dpkg's status file.
pub fn installed_versions(admindir: &Path) -> BTreeMap<String, String> {
    Database::new(admindir).installed_versions()
}

pub fn read_packages_state(admindir: &Path, wanted: &[String]) -> BTreeMap<String, PackageState> {
    Database::new(admindir).packages_state(wanted)
}

/// The systemd units a package owns (see [`Database::package_units`]).
pub fn package_units(admindir: &Path, name: &str) -> Vec<String> {
    Database::new(admindir).package_units(name)
}

/// What the agent needs of one package's paragraph in dpkg's status file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    version: Option<String>,
    arch: Option<String>,
    /// dpkg's state word: `installed`, `config-files`, `half-configured`, ...
    state: String,
    held: bool,
    /// `X-Debfleet-Units`.
    units: Vec<String>,
    /// `X-Debfleet-Component`: the component the package ships.
    component: Option<String>,
}

/// Reads the status file line by line into the compact records (the file itself, with every
/// description, is large on a full system; it is never held whole).
fn parse_status(reader: impl std::io::BufRead) -> BTreeMap<String, Record> {
    let mut out = BTreeMap::new();
    let mut name: Option<String> = None;
    let empty = || Record { version: None, arch: None, state: String::new(), held: false, units: Vec::new(), component: None };
    let mut rec = empty();
    let mut flush = |name: &mut Option<String>, rec: &mut Record| {
        let taken = std::mem::replace(rec, empty());
        if let Some(n) = name.take() {
            if !taken.state.is_empty() {
                out.insert(n, taken);
            }
        }
    };
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            flush(&mut name, &mut rec);
            continue;
        }
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        match k {
            "Package" => name = Some(v.to_owned()),
            "Version" => rec.version = Some(v.to_owned()),
            "Architecture" => rec.arch = Some(v.to_owned()),
            "Status" => {
                // "want flag state", e.g. "install ok installed" or "hold ok installed".
                let mut words = v.split_whitespace();
                rec.held = words.next() == Some("hold");
                rec.state = words.nth(1).unwrap_or("unknown").to_owned();
            }
            "X-Debfleet-Units" => {
                rec.units = v.split_whitespace().filter(|u| valid_unit_name(u)).map(str::to_owned).collect()
            }
            "X-Debfleet-Component" => {
                rec.component = debfleet_protocol::ComponentId::new(v).ok().map(|c| c.to_string())
            }
            _ => {}
        }
    }
    flush(&mut name, &mut rec);
    out
}

fn is_installed(state: &str) -> bool {
    state != "not-installed" && state != "config-files"
}

/// dpkg's database, read once per change rather than once per question: dpkg replaces
/// `status` by rename, so the file's identity (device, inode, size, modification time) tells
/// whether the records held are current. Shared by the agent's core and its jobs.
pub struct Database {
    admindir: std::path::PathBuf,
    cached: std::sync::Mutex<Option<(Stamp, std::sync::Arc<BTreeMap<String, Record>>)>>,
}

type Stamp = (u64, u64, u64, i64, i64);

impl Database {
    pub fn new(admindir: &Path) -> Database {
        Database { admindir: admindir.to_owned(), cached: std::sync::Mutex::new(None) }
    }

    pub fn admindir(&self) -> &Path {
        &self.admindir
    }

    fn records(&self) -> std::sync::Arc<BTreeMap<String, Record>> {
        use std::os::unix::fs::MetadataExt;
        let path = self.admindir.join("status");
        let stamp = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(now), Some((then, records))) = (stamp, cached.as_ref()) {
            if now == *then {
                return records.clone();
            }
        }
        let records = std::sync::Arc::new(match std::fs::File::open(&path) {
            Ok(f) => parse_status(std::io::BufReader::new(f)),
            Err(_) => BTreeMap::new(),
        });
        *cached = stamp.map(|s| (s, records.clone()));
        records
    }

    pub fn packages_state(&self, wanted: &[String]) -> BTreeMap<String, PackageState> {
        packages_state_in(&self.records(), wanted)
    }

    pub fn installed_versions(&self) -> BTreeMap<String, String> {
        self.records()
            .iter()
            .filter(|(_, r)| is_installed(&r.state))
            .filter_map(|(n, r)| r.version.clone().map(|v| (n.clone(), v)))
            .collect()
    }

    /// The installed packages that ship a component (`X-Debfleet-Component`): component id,
    /// package, version, and the package's first unit.
    pub fn components(&self) -> Vec<InstalledComponent> {
        let records = self.records();
        records
            .iter()
            .filter(|(_, r)| is_installed(&r.state))
            .filter_map(|(name, r)| {
                Some(InstalledComponent {
                    component: r.component.clone()?,
                    package: name.clone(),
                    version: r.version.clone().unwrap_or_default(),
                    unit: self.package_units(name).into_iter().find(|u| u.ends_with(".service")).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The systemd units a package owns: its `X-Debfleet-Units` field and the unit files in its
    /// file list (`NAME.list`, or `NAME:ARCH.list` for a `Multi-Arch: same` package).
    pub fn package_units(&self, name: &str) -> Vec<String> {
        let records = self.records();
        let rec = records.get(name);
        let mut units = rec.map(|r| r.units.clone()).unwrap_or_default();
        let arch =
            rec.and_then(|r| r.arch.clone()).unwrap_or_else(|| debfleet_protocol::debian::host_arch().to_owned());
        units.extend(list_units(&self.admindir, name, &arch));
        units.sort();
        units.dedup();
        units
    }
}

/// A component as the package database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledComponent {
    pub component: String,
    pub package: String,
    pub version: String,
    /// Its service (empty when the package has none).
    pub unit: String,
}

/// Unit files in a package's dpkg file list.
fn list_units(admindir: &Path, name: &str, arch: &str) -> Vec<String> {
    let info = admindir.join("info");
    let list = std::fs::read_to_string(info.join(format!("{name}.list")))
        .or_else(|_| std::fs::read_to_string(info.join(format!("{name}:{arch}.list"))))
        .unwrap_or_default();
    let mut units = Vec::new();
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
    units
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
        let first = db.records();
        assert!(std::sync::Arc::ptr_eq(&first, &db.records()), "unchanged: the same records");
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

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn units_from_the_control_field_and_the_file_list() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("info")).unwrap();
        std::fs::write(
            dir.path().join("status"),
            "Package: led\nStatus: install ok installed\nVersion: 1\nX-Debfleet-Units: led.service led-watch.timer\nX-Debfleet-Component: led-strip\n\nPackage: other\nStatus: install ok installed\nX-Debfleet-Component: ../bad\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("info/led.list"), "/usr/bin/led\n/lib/systemd/system/led.service\n/lib/systemd/system/led-extra.socket\n/lib/systemd/system/getty@.service\n").unwrap();
        assert_eq!(package_units(dir.path(), "led"), ["led-extra.socket", "led-watch.timer", "led.service"]);
        // A component id that breaks the syntax is no component.
        let c = Database::new(dir.path()).components();
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].component.as_str(), c[0].package.as_str(), c[0].unit.as_str()), ("led-strip", "led", "led.service"));
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
