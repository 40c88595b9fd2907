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

fn packages_state_in(records: &Records, wanted: &[String]) -> BTreeMap<String, PackageState> {
    wanted
        .iter()
        .map(|w| {
            let state = match records.get(w) {
                Some(r) => {
                    let installed = is_installed(r.state);
                    PackageState {
                        version: r.version.filter(|_| installed).map(str::to_owned),
                        arch: r.arch.filter(|_| installed).map(str::to_owned),
                        status: r.state.to_owned(),
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

/// What the agent needs of dpkg's status file, compact: a full system has a thousand or more
/// packages and the agent holds them all, so they live in one text buffer (a line per package:
/// name, version, architecture, state, held, units, component, tab-separated) with an index
/// sorted by name — about 50 bytes a package, where a map of strings costs five times that.
#[derive(Debug, Default, PartialEq, Eq)]
struct Records {
    text: String,
    /// Start of each package's line, sorted by name.
    index: Vec<u32>,
}

/// One package's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record<'a> {
    name: &'a str,
    version: Option<&'a str>,
    arch: Option<&'a str>,
    /// dpkg's state word: `installed`, `config-files`, `half-configured`, ...
    state: &'a str,
    held: bool,
    /// `X-Debfleet-Units`, space-separated.
    units: &'a str,
    /// `X-Debfleet-Component`.
    component: Option<&'a str>,
}

impl Records {
    fn line(&self, start: u32) -> Record<'_> {
        let rest = &self.text[start as usize..];
        let line = rest.split('\n').next().unwrap_or("");
        let mut f = line.split('\t');
        let mut next = || f.next().unwrap_or("");
        fn some(s: &str) -> Option<&str> {
            (!s.is_empty()).then_some(s)
        }
        let (name, version, arch, state, held, units, component) =
            (next(), next(), next(), next(), next(), next(), next());
        Record {
            name,
            version: some(version),
            arch: some(arch),
            state,
            held: held == "h",
            units,
            component: some(component),
        }
    }

    fn get(&self, name: &str) -> Option<Record<'_>> {
        self.index.binary_search_by(|i| self.line(*i).name.cmp(name)).ok().map(|i| self.line(self.index[i]))
    }

    fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        self.index.iter().map(|i| self.line(*i))
    }
}

impl Record<'_> {
    fn units(&self) -> impl Iterator<Item = &str> {
        self.units.split(' ').filter(|u| !u.is_empty())
    }
}

/// One paragraph's fields as they are read.
#[derive(Default)]
struct Paragraph {
    name: String,
    version: String,
    arch: String,
    state: String,
    held: bool,
    units: String,
    component: String,
}

/// Reads the status file line by line into the compact records (the file itself, with every
/// description, is large on a full system; it is never held whole). A package listed twice
/// keeps its last paragraph, as dpkg would.
fn parse_status(reader: impl std::io::BufRead) -> Records {
    let mut r = Records::default();
    let mut p = Paragraph::default();
    let clean = |s: &str| s.replace(['\t', '\n'], " ");
    let flush = |p: &mut Paragraph, r: &mut Records| {
        let p = std::mem::take(p);
        if p.name.is_empty() || p.state.is_empty() || r.text.len() > u32::MAX as usize / 2 {
            return;
        }
        let start = r.text.len() as u32;
        let held = if p.held { "h" } else { "" };
        let fields = [p.name.as_str(), &p.version, &p.arch, &p.state, held, &p.units, &p.component];
        r.text.push_str(&fields.map(clean).join("\t"));
        r.text.push('\n');
        r.index.push(start);
    };
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            flush(&mut p, &mut r);
            continue;
        }
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let Some((k, v)) = line.split_once(':') else { continue };
        let v = v.trim();
        match k {
            "Package" => p.name = v.to_owned(),
            "Version" => p.version = v.to_owned(),
            "Architecture" => p.arch = v.to_owned(),
            "Status" => {
                // "want flag state", e.g. "install ok installed" or "hold ok installed".
                let mut words = v.split_whitespace();
                p.held = words.next() == Some("hold");
                p.state = words.nth(1).unwrap_or("unknown").to_owned();
            }
            "X-Debfleet-Units" => {
                p.units = v.split_whitespace().filter(|u| valid_unit_name(u)).collect::<Vec<_>>().join(" ")
            }
            "X-Debfleet-Component" => {
                if let Ok(c) = debfleet_protocol::ComponentId::new(v) {
                    p.component = c.to_string();
                }
            }
            _ => {}
        }
    }
    flush(&mut p, &mut r);
    // Sorted by name, the last paragraph of a name winning.
    let mut index = std::mem::take(&mut r.index);
    index.reverse();
    index.sort_by(|a, b| r.line(*a).name.cmp(r.line(*b).name));
    index.dedup_by(|a, b| r.line(*a).name == r.line(*b).name);
    index.shrink_to_fit();
    r.index = index;
    r.text.shrink_to_fit();
    r
}

fn is_installed(state: &str) -> bool {
    state != "not-installed" && state != "config-files"
}

/// dpkg's database, read once per change rather than once per question: dpkg replaces
/// `status` by rename, so the file's identity (device, inode, size, modification time) tells
/// whether the records held are current. Shared by the agent's core and its jobs.
pub struct Database {
    admindir: std::path::PathBuf,
    cached: std::sync::Mutex<Option<(Stamp, std::sync::Arc<Records>)>>,
}

type Stamp = (u64, u64, u64, i64, i64);

impl Database {
    pub fn new(admindir: &Path) -> Database {
        Database { admindir: admindir.to_owned(), cached: std::sync::Mutex::new(None) }
    }

    pub fn admindir(&self) -> &Path {
        &self.admindir
    }

    fn records(&self) -> std::sync::Arc<Records> {
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
            Err(_) => Records::default(),
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
            .filter(|r| is_installed(r.state))
            .filter_map(|r| r.version.map(|v| (r.name.to_owned(), v.to_owned())))
            .collect()
    }

    /// The installed packages that ship a component (`X-Debfleet-Component`): component id,
    /// package, version, and the package's first unit.
    pub fn components(&self) -> Vec<InstalledComponent> {
        let records = self.records();
        records
            .iter()
            .filter(|r| is_installed(r.state))
            .filter_map(|r| {
                Some(InstalledComponent {
                    component: r.component?.to_owned(),
                    package: r.name.to_owned(),
                    version: r.version.unwrap_or_default().to_owned(),
                    unit: self.package_units(r.name).into_iter().find(|u| u.ends_with(".service")).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The systemd units a package owns: its `X-Debfleet-Units` field and the unit files in its
    /// file list (`NAME.list`, or `NAME:ARCH.list` for a `Multi-Arch: same` package).
    pub fn package_units(&self, name: &str) -> Vec<String> {
        let records = self.records();
        let rec = records.get(name);
        let mut units: Vec<String> = rec.map(|r| r.units().map(str::to_owned).collect()).unwrap_or_default();
        let arch = rec.and_then(|r| r.arch).unwrap_or_else(|| debfleet_protocol::debian::host_arch()).to_owned();
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
    fn a_package_listed_twice_keeps_its_last_paragraph_and_lookups_need_no_order() {
        let text = "Package: zed\nStatus: install ok installed\nVersion: 1\n\nPackage: abc\nStatus: install ok installed\nVersion: 1\n\nPackage: zed\nStatus: install ok installed\nVersion: 2\nX-Debfleet-Units: z.service\n";
        let r = parse_status(std::io::Cursor::new(text));
        assert_eq!(r.index.len(), 2);
        assert_eq!(r.get("zed").unwrap().version, Some("2"));
        assert_eq!(r.get("zed").unwrap().units().collect::<Vec<_>>(), ["z.service"]);
        assert_eq!(r.get("abc").unwrap().version, Some("1"));
        assert!(r.get("abd").is_none());
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
        assert_eq!(
            (c[0].component.as_str(), c[0].package.as_str(), c[0].unit.as_str()),
            ("led-strip", "led", "led.service")
        );
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
