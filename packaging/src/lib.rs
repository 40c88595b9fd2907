//! Builds .deb packages from a small TOML manifest — debfleet's own packages and ops teams'
//! components alike — with debian-packaging's builder: xz-compressed members, sorted entries,
//! root-owned files and one timestamp (`SOURCE_DATE_EPOCH`), so the same input gives the same
//! bytes. Systemd units get the maintainer-script logic debhelper would generate.

mod scripts;

use std::path::{Path, PathBuf};

use debfleet_protocol::debian::{valid_package_name, valid_version};
use debian_packaging::control::{ControlFile, ControlParagraph};
use debian_packaging::deb::builder::write_deb_tar;
use debian_packaging::deb::DebCompression;
use serde::Deserialize;
use simple_file_manifest::{FileEntry, FileManifest};

/// The control field listing the systemd units a package owns; the agent watches them.
pub const UNITS_FIELD: &str = "X-Debfleet-Units";
/// The control field naming the component a package ships; the agent lists it.
pub const COMPONENT_FIELD: &str = "X-Debfleet-Component";

#[derive(Debug, thiserror::Error)]
pub enum PackagingError {
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("building the .deb: {0}")]
    Build(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub package: PackageInfo,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub units: Vec<UnitSpec>,
    #[serde(default)]
    pub scripts: ScriptSnippets,
    /// Directories created on install (root-owned, 0755) and removed on purge: the package's
    /// state.
    #[serde(default)]
    pub state_dirs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// First line: the synopsis; further lines: the long description.
    pub description: String,
    pub maintainer: String,
    #[serde(default)]
    pub depends: Vec<String>,
    #[serde(default = "default_section")]
    pub section: String,
    #[serde(default = "default_priority")]
    pub priority: String,
    #[serde(default)]
    pub homepage: Option<String>,
    /// A copyright file (relative to the manifest); without one, a short one naming the
    /// maintainer and `license` is generated.
    #[serde(default)]
    pub copyright: Option<PathBuf>,
    #[serde(default = "default_license")]
    pub license: String,
    /// The component the package ships (its id), for `X-Debfleet-Component`.
    #[serde(default)]
    pub component: Option<String>,
}

fn default_section() -> String {
    "misc".into()
}
fn default_priority() -> String {
    "optional".into()
}
fn default_license() -> String {
    "proprietary".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Relative to the manifest's directory.
    pub source: PathBuf,
    /// Absolute path on the device.
    pub dest: String,
    /// Octal, e.g. "0755"; default: 0755 when the source is executable, else 0644.
    #[serde(default)]
    pub mode: Option<String>,
    /// Files under /etc are conffiles unless this says otherwise.
    #[serde(default)]
    pub conffile: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSpec {
    /// A systemd unit file, relative to the manifest; installed as /lib/systemd/system/NAME.
    pub source: PathBuf,
    #[serde(default = "yes")]
    pub enable: bool,
    #[serde(default = "yes")]
    pub start: bool,
}

fn yes() -> bool {
    true
}

/// Shell snippets run by the generated maintainer scripts (before units are started in
/// postinst, after they are stopped in prerm).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptSnippets {
    pub preinst: Option<String>,
    pub postinst: Option<String>,
    pub prerm: Option<String>,
    pub postrm: Option<String>,
}

pub struct BuildOptions {
    /// Replaces the manifest's version (e.g. a CI build number).
    pub version: Option<String>,
    /// Replaces the manifest's architecture (building the same manifest for arm64, say).
    pub architecture: Option<String>,
    /// The timestamp of every archive member and of the changelog entry.
    pub source_date_epoch: u64,
    pub out_dir: PathBuf,
}

impl BuildOptions {
    /// `SOURCE_DATE_EPOCH` from the environment, else now.
    pub fn epoch_from_env() -> u64 {
        std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
        })
    }
}

pub fn load(path: &Path) -> Result<Manifest, PackagingError> {
    let text = std::fs::read_to_string(path).map_err(|source| PackagingError::Io { path: path.into(), source })?;
    toml::from_str(&text).map_err(|e| PackagingError::Manifest { path: path.into(), message: e.to_string() })
}

fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    (digits.len() <= 4 && !digits.is_empty())
        .then(|| u32::from_str_radix(digits, 8).ok())
        .flatten()
        .filter(|m| *m <= 0o7777)
}

fn valid_dest(dest: &str) -> bool {
    dest.starts_with('/')
        && !dest.ends_with('/')
        && dest.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
        && dest.chars().all(|c| !c.is_control() && c != '\\' && !c.is_whitespace())
}

/// A `Depends` entry: one package, alternatives with `|`, optional version constraints.
fn valid_dependency(d: &str) -> bool {
    !d.is_empty()
        && d.split('|').all(|alt| {
            let alt = alt.trim();
            let (name, rest) = alt.split_once(' ').map(|(n, r)| (n, r.trim())).unwrap_or((alt, ""));
            let name = name.split_once(':').map(|(n, _)| n).unwrap_or(name);
            let constraint_ok = rest.is_empty()
                || rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')).is_some_and(|c| {
                    let c = c.trim();
                    let (op, ver) = ["<<", "<=", ">=", ">>", "="]
                        .iter()
                        .find_map(|op| c.strip_prefix(op).map(|v| (*op, v.trim())))
                        .unwrap_or(("", ""));
                    !op.is_empty() && valid_version(ver.trim_end_matches('~'))
                });
            valid_package_name(name) && constraint_ok
        })
}

struct Checked {
    version: String,
    arch: String,
    files: Vec<(String, Vec<u8>, u32)>,
    conffiles: Vec<String>,
    units: Vec<(String, Vec<u8>, bool, bool)>,
}

fn check(m: &Manifest, base: &Path, path: &Path, opts: &BuildOptions) -> Result<Checked, PackagingError> {
    let bad = |message: String| PackagingError::Manifest { path: path.into(), message };
    let p = &m.package;
    if !valid_package_name(&p.name) {
        return Err(bad(format!("package.name {:?} is not a Debian package name", p.name)));
    }
    if let Some(id) = &p.component {
        if let Err(e) = debfleet_protocol::ComponentId::new(id.as_str()) {
            return Err(bad(format!("package.component: {e}")));
        }
    }
    let version = opts.version.clone().unwrap_or_else(|| p.version.clone());
    if !valid_version(&version) {
        return Err(bad(format!("version {version:?} is not a Debian version")));
    }
    let arch = opts.architecture.clone().unwrap_or_else(|| p.architecture.clone());
    if !arch.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') || arch.is_empty() {
        return Err(bad(format!("architecture {arch:?} is not a Debian architecture")));
    }
    let synopsis = p.description.lines().next().unwrap_or("").trim();
    if synopsis.is_empty() || synopsis.len() > 80 {
        return Err(bad("package.description needs a first line (the synopsis) of 1-80 characters".into()));
    }
    if !(p.maintainer.contains('<') && p.maintainer.ends_with('>')) || p.maintainer.contains('\n') {
        return Err(bad(format!("package.maintainer {:?} must read \"Name <email>\"", p.maintainer)));
    }
    for d in &p.depends {
        if !valid_dependency(d) {
            return Err(bad(format!(
                "package.depends entry {d:?} is not \"name\", \"name (>= version)\" or alternatives with |"
            )));
        }
    }
    for field in [&p.section, &p.priority, &p.license] {
        if field.is_empty() || field.contains('\n') {
            return Err(bad(format!("{field:?} must be a single line")));
        }
    }
    let read = |rel: &Path| {
        let full = base.join(rel);
        std::fs::read(&full).map_err(|source| PackagingError::Io { path: full, source })
    };
    let mut files = Vec::new();
    let mut conffiles = Vec::new();
    for f in &m.files {
        if !valid_dest(&f.dest) {
            return Err(bad(format!("files: dest {:?} must be an absolute path without . or .. parts", f.dest)));
        }
        let data = read(&f.source)?;
        let mode = match &f.mode {
            Some(s) => parse_mode(s)
                .ok_or_else(|| bad(format!("files: mode {s:?} of {} is not octal like \"0644\"", f.dest)))?,
            None => {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(base.join(&f.source))
                    .map_err(|source| PackagingError::Io { path: base.join(&f.source), source })?;
                if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                }
            }
        };
        if f.conffile.unwrap_or_else(|| f.dest.starts_with("/etc/")) {
            if !f.dest.starts_with("/etc/") {
                return Err(bad(format!("files: {} is marked conffile but is not under /etc", f.dest)));
            }
            conffiles.push(f.dest.clone());
        }
        files.push((f.dest.clone(), data, mode));
    }
    let mut units = Vec::new();
    for u in &m.units {
        let name = u.source.file_name().and_then(|n| n.to_str()).unwrap_or("").to_owned();
        if !debfleet_protocol::units::valid_unit_name(&name) || name.contains(['\\', ':']) {
            return Err(bad(format!("units: {name:?} is not a systemd unit file name")));
        }
        units.push((name, read(&u.source)?, u.enable, u.start));
    }
    for d in &m.state_dirs {
        if !valid_dest(d) || !(d.starts_with("/var/") || d.starts_with("/etc/") || d.starts_with("/srv/")) {
            return Err(bad(format!("state_dirs: {d:?} must be an absolute path under /var, /etc or /srv")));
        }
    }
    Ok(Checked { version, arch, files, conffiles, units })
}

/// Builds the package; returns the path of the .deb written into `opts.out_dir`.
pub fn build(m: &Manifest, manifest_path: &Path, opts: &BuildOptions) -> Result<PathBuf, PackagingError> {
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let c = check(m, base, manifest_path, opts)?;
    let p = &m.package;
    let build_err = |e: debian_packaging::error::DebianError| PackagingError::Build(e.to_string());

    // Data files: the manifest's, the units, the documentation.
    let mut data: Vec<(String, Vec<u8>, u32)> = c.files.clone();
    for (name, bytes, _, _) in &c.units {
        data.push((format!("/lib/systemd/system/{name}"), bytes.clone(), 0o644));
    }
    let doc = format!("/usr/share/doc/{}", p.name);
    let copyright = match &p.copyright {
        Some(rel) => std::fs::read(base.join(rel)).map_err(|source| PackagingError::Io { path: base.join(rel), source })?,
        None => format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: {}\n\nFiles: *\nCopyright: {}\nLicense: {}\n",
            p.name, p.maintainer, p.license
        )
        .into_bytes(),
    };
    data.push((format!("{doc}/copyright"), copyright, 0o644));
    let changelog_name = if c.version.contains('-') { "changelog.Debian.gz" } else { "changelog.gz" };
    data.push((
        format!("{doc}/{changelog_name}"),
        changelog(&p.name, &c.version, &p.maintainer, opts.source_date_epoch),
        0o644,
    ));

    let installed_kib = data.iter().map(|(_, b, _)| b.len() as u64).sum::<u64>().div_ceil(1024).max(1);
    let mut para = ControlParagraph::default();
    let mut set = |k: &'static str, v: String| para.set_field_from_string(k.into(), v.into());
    set("Package", p.name.clone());
    set("Version", c.version.clone());
    set("Architecture", c.arch.clone());
    set("Maintainer", p.maintainer.clone());
    set("Installed-Size", installed_kib.to_string());
    let mut depends = p.depends.clone();
    if !c.units.is_empty() && !depends.iter().any(|d| d.starts_with("init-system-helpers")) {
        // deb-systemd-helper and deb-systemd-invoke in the generated scripts.
        depends.push("init-system-helpers (>= 1.54~)".into());
    }
    if !depends.is_empty() {
        set("Depends", depends.join(", "));
    }
    set("Section", p.section.clone());
    set("Priority", p.priority.clone());
    if let Some(h) = &p.homepage {
        set("Homepage", h.clone());
    }
    if !c.units.is_empty() {
        set(UNITS_FIELD, c.units.iter().map(|u| u.0.clone()).collect::<Vec<_>>().join(" "));
    }
    if let Some(id) = &p.component {
        set(COMPONENT_FIELD, id.clone());
    }
    set("Description", description_field(&p.description));
    let mut control = ControlFile::default();
    control.add_paragraph(para);

    let mut data_files = FileManifest::default();
    let mut md5sums = String::new();
    for (dest, bytes, mode) in &data {
        use md5::Digest;
        let rel = dest.trim_start_matches('/');
        let exec = mode & 0o111 != 0;
        data_files
            .add_file_entry(rel, FileEntry::new_from_data(bytes.clone(), exec))
            .map_err(|e| PackagingError::Build(e.to_string()))?;
        let digest = md5::Md5::digest(bytes);
        md5sums.push_str(&format!("{}  {rel}\n", digest.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    }
    let mut control_text = Vec::new();
    control.write(&mut control_text).map_err(|e| PackagingError::Build(e.to_string()))?;
    let mut control_files = FileManifest::default();
    let mut add_control = |name: &str, bytes: Vec<u8>, exec: bool| {
        control_files
            .add_file_entry(name, FileEntry::new_from_data(bytes, exec))
            .map_err(|e| PackagingError::Build(e.to_string()))
    };
    add_control("control", control_text, false)?;
    add_control("md5sums", md5sums.into_bytes(), false)?;
    if !c.conffiles.is_empty() {
        add_control("conffiles", c.conffiles.iter().map(|f| format!("{f}\n")).collect::<String>().into_bytes(), false)?;
    }
    // Modes the tar writer cannot carry (anything but 0644/0755) are set by postinst.
    let chmods: Vec<(String, u32)> =
        data.iter().filter(|(_, _, m)| *m != 0o644 && *m != 0o755).map(|(d, _, m)| (d.clone(), *m)).collect();
    for (name, text) in
        scripts::generate(m, &c.units.iter().map(|u| (u.0.clone(), u.2, u.3)).collect::<Vec<_>>(), &chmods)
    {
        add_control(&name, text.into_bytes(), true)?;
    }
    let bytes = assemble(&control_files, &data_files, opts.source_date_epoch).map_err(build_err)?;
    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|source| PackagingError::Io { path: opts.out_dir.clone(), source })?;
    let out = opts.out_dir.join(format!(
        "{}_{}_{}.deb",
        p.name,
        c.version.split_once(':').map(|x| x.1).unwrap_or(&c.version),
        c.arch
    ));
    let tmp = out.with_extension("deb.tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|_| std::fs::rename(&tmp, &out))
        .map_err(|source| PackagingError::Io { path: out.clone(), source })?;
    Ok(out)
}

/// The .deb container: `debian-binary`, then control.tar.xz and data.tar.xz, written with
/// debian-packaging's tar writer (sorted entries, root owners, one mtime) and the ar crate.
/// (debian-packaging's own DebBuilder writes the md5sums file with raw digest bytes instead of
/// hex, which dpkg and lintian reject; so the md5sums and the assembly are done here.)
fn assemble(
    control: &FileManifest,
    data: &FileManifest,
    mtime: u64,
) -> Result<Vec<u8>, debian_packaging::error::DebianError> {
    let compression = DebCompression::Xz(6);
    let mut out = Vec::new();
    {
        let mut ar = ar::Builder::new(&mut out);
        let mut append = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
            let mut header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(mtime);
            header.set_uid(0);
            header.set_gid(0);
            ar.append(&header, bytes)
        };
        append("debian-binary", b"2.0\n")?;
        for (name, manifest) in [("control.tar", control), ("data.tar", data)] {
            let mut tar = Vec::new();
            write_deb_tar(&mut tar, manifest, mtime)?;
            let compressed = compression.compress(&mut std::io::Cursor::new(tar))?;
            append(&format!("{name}{}", compression.extension()), &compressed)?;
        }
    }
    Ok(out)
}

/// The Description field: synopsis, then the long text with each line indented and empty lines
/// as " ." (Debian policy 5.6.13).
fn description_field(text: &str) -> String {
    let mut lines = text.trim_end().lines();
    let mut out = lines.next().unwrap_or("").trim().to_owned();
    for l in lines {
        out.push('\n');
        let l = l.trim_end();
        out.push_str(if l.trim().is_empty() { " ." } else { "" });
        if !l.trim().is_empty() {
            out.push(' ');
            out.push_str(l.trim_start());
        }
    }
    out
}

/// A one-entry Debian changelog, compressed reproducibly (no name or time in the gzip header).
fn changelog(name: &str, version: &str, maintainer: &str, epoch: u64) -> Vec<u8> {
    use std::io::Write;
    let date = httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch))
        .replace(" GMT", " +0000");
    let text = format!(
        "{name} ({version}) unstable; urgency=medium\n\n  * Built with debfleet package.\n\n -- {maintainer}  {date}\n"
    );
    let mut enc = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    enc.write_all(text.as_bytes()).expect("in-memory write");
    enc.finish().expect("in-memory write")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_and_modes() {
        for d in ["libc6", "libc6 (>= 2.36)", "python3 | python3-minimal", "foo (<< 2.0~)", "bar:any"] {
            assert!(valid_dependency(d), "{d}");
        }
        for d in ["", "Foo", "libc6 (>= )", "a; rm -rf /", "libc6 (~ 1)", "x\ny"] {
            assert!(!valid_dependency(d), "{d:?}");
        }
        assert_eq!(parse_mode("0755"), Some(0o755));
        assert_eq!(parse_mode("600"), Some(0o600));
        assert_eq!(parse_mode("9"), None);
        assert_eq!(parse_mode("77777"), None);
        assert!(
            valid_dest("/usr/bin/x") && !valid_dest("usr/bin/x") && !valid_dest("/usr/../etc") && !valid_dest("/a b")
        );
    }

    #[test]
    fn description_is_formatted() {
        assert_eq!(description_field("Short\nlong one\n\nlong two"), "Short\n long one\n .\n long two");
    }
}
