//! Running apt-get with its status stream on a pipe.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::errors::{classify, AptError};
use crate::simulate::{self, Changes};
use crate::status::{self, Status};

/// `NAME` or `NAME=VERSION`, validated against Debian policy before it nears a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub version: Option<String>,
    /// Without a version: the newest from this release (suite), apt's `NAME/RELEASE`.
    pub release: Option<String>,
}

impl Spec {
    pub fn parse(s: &str) -> Result<Spec, AptError> {
        let p = debfleet_protocol::PackageSpec::parse(s).map_err(|_| AptError::InvalidSpec(s.to_owned()))?;
        Ok(Spec { name: p.name, version: p.version, release: None })
    }

    /// A package by name alone: the newest version apt has.
    pub fn named(name: &str) -> Spec {
        Spec { name: name.to_owned(), version: None, release: None }
    }

    fn arg(&self) -> String {
        match (&self.version, &self.release) {
            (Some(v), _) => format!("{}={v}", self.name),
            (None, Some(r)) => format!("{}/{r}", self.name),
            (None, None) => self.name.clone(),
        }
    }
}

/// A package apt installs from a local file instead of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDeb {
    pub package: String,
    /// Absolute (apt takes an argument as a file only when it looks like a path).
    pub path: std::path::PathBuf,
}

#[derive(Debug, Clone)]
pub enum Op {
    Install(Vec<Spec>),
    /// Upgrade these packages to the given or newest versions.
    Upgrade(Vec<Spec>),
    Remove {
        names: Vec<Spec>,
        purge: bool,
    },
}

/// One progress event, in debfleet's phases.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// `downloading`, `unpacking`, `configuring`, `removing`, `triggers` or `installing`.
    pub phase: debfleet_protocol::Phase,
    pub percent: f32,
    pub package: Option<String>,
    pub text: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    /// What apt said it would fetch ("Need to get ..."), in bytes.
    pub download_bytes: u64,
    /// The packages apt downloaded from repositories: (name, version, bytes).
    pub downloads: Vec<(String, String, u64)>,
    pub conffiles_kept: Vec<String>,
}

/// How to run apt: the commands and options. A command is a program with leading arguments,
/// so a caller can run apt elsewhere (`nsenter -t PID -a -- apt-get` for a test device).
#[derive(Debug, Clone)]
pub struct Apt {
    pub apt_get: Vec<String>,
    pub dpkg: Vec<String>,
    /// Seconds to wait for another apt or dpkg (unattended-upgrades) to let go of the lock.
    pub lock_timeout_s: u32,
    /// Extra `-o` options for every apt-get call.
    pub options: Vec<String>,
}

impl Default for Apt {
    fn default() -> Self {
        Apt { apt_get: vec!["apt-get".into()], dpkg: vec!["dpkg".into()], lock_timeout_s: 120, options: Vec::new() }
    }
}

/// Parses apt's "Need to get 1,234 kB of archives" (SI units, as apt prints them).
pub fn need_to_get(output: &str) -> u64 {
    after_words(output, "Need to get ")
}

/// Parses apt-get update's "Fetched 1,234 kB in 1s (...)": what the indices cost.
pub fn fetched(output: &str) -> u64 {
    after_words(output, "Fetched ")
}

/// The packages a transaction downloaded, from its `Get:N URL DIST/COMP ARCH NAME ARCH VERSION
/// [SIZE]` lines (local files have no URL and are left out).
pub fn downloads(output: &str) -> Vec<(String, String, u64)> {
    output
        .lines()
        .filter(|l| l.starts_with("Get:"))
        .filter_map(|l| {
            let (head, size) = l.rsplit_once(" [")?;
            let w: Vec<&str> = head.split_whitespace().collect();
            let [_, url, _, _, name, _, version] = w.as_slice() else { return None };
            url.contains("://")
                .then(|| ((*name).to_owned(), (*version).to_owned(), size_words(size.trim_end_matches(']'))))
        })
        .collect()
}

/// What an `apt-get update` fetched, and what it would have fetched without index diffs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdateBytes {
    pub fetched: u64,
    pub without_diffs: u64,
}

/// Reads apt-get update's `Get:` lines: where it fetched a `Packages.diff/Index` and patches,
/// the whole index would have cost the `Packages.xz` its (signed, already fetched) InRelease
/// lists. `lists` is apt's lists directory.
pub fn update_bytes(output: &str, lists: &std::path::Path) -> UpdateBytes {
    let fetched = fetched(output);
    let mut seen = std::collections::HashSet::new();
    // Per index (URL, suite/component, architecture): bytes of its diff index and patches.
    let mut targets: std::collections::BTreeMap<(&str, &str, &str), (u64, bool)> = Default::default();
    for line in output.lines().filter(|l| l.starts_with("Get:")) {
        // apt prints a patch's line twice.
        if !seen.insert(line) {
            continue;
        }
        let Some((head, size)) = line.rsplit_once(" [") else { continue };
        let size = size_words(size.trim_end_matches(']'));
        let words: Vec<&str> = head.split_whitespace().collect();
        // Get:N URL SUITE/COMPONENT ARCH WHAT [NAME]
        let [_, url, suite_comp, arch, what, rest @ ..] = words.as_slice() else { continue };
        let patch = *what == "Packages" && rest.first().is_some_and(|n| n.ends_with(".pdiff"));
        if *what == "Packages.diff/Index" || patch {
            let t = targets.entry((url, suite_comp, arch)).or_default();
            t.0 += size;
            t.1 |= patch;
        }
    }
    // Only an index that was patched replaced a whole download (one more than 15 versions
    // behind fetched the diff index, then the whole file anyway).
    let (mut diffs, mut instead) = (0u64, 0u64);
    for ((url, suite_comp, arch), (bytes, patched)) in targets {
        let Some((suite, comp)) = suite_comp.split_once('/') else { continue };
        if patched {
            diffs += bytes;
            instead += whole_index_size(lists, url, suite, &format!("{comp}/binary-{arch}/Packages"));
        }
    }
    UpdateBytes { fetched, without_diffs: (fetched + instead).saturating_sub(diffs) }
}

/// The size of the compressed index apt would fetch whole (xz first, as apt prefers), from the
/// InRelease apt keeps in its lists.
fn whole_index_size(lists: &std::path::Path, url: &str, suite: &str, key: &str) -> u64 {
    let site = url.split_once("://").map(|(_, r)| r).unwrap_or(url).trim_end_matches('/');
    let file = lists.join(format!("{}_dists_{suite}_InRelease", site.replace('/', "_")));
    let Ok(text) = std::fs::read_to_string(file) else { return 0 };
    let sizes: Vec<(String, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (_hash, size, name) = (w.next()?, w.next()?.parse().ok()?, w.next()?);
            Some((name.to_owned(), size))
        })
        .collect();
    [".xz", ".gz", ""]
        .iter()
        .find_map(|ext| sizes.iter().find(|(n, _)| *n == format!("{key}{ext}")).map(|(_, s)| *s))
        .unwrap_or(0)
}

/// The size apt prints after `prefix` at the start of a line, in bytes.
fn after_words(output: &str, prefix: &str) -> u64 {
    let Some(line) = output.lines().find(|l| l.starts_with(prefix)) else { return 0 };
    size_words(&line[prefix.len()..])
}

/// "1,234 kB ..." (SI units, as apt prints them) in bytes.
fn size_words(text: &str) -> u64 {
    let mut words = text.split_whitespace();
    let (Some(num), Some(unit)) = (words.next(), words.next()) else { return 0 };
    let num = num.split('/').next().unwrap_or(num).replace(',', "");
    let Ok(n) = num.parse::<f64>() else { return 0 };
    let mult = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return 0,
    };
    (n * mult) as u64
}

impl Apt {
    fn base(&self) -> Command {
        let mut c = command(&self.apt_get);
        c.env("DEBIAN_FRONTEND", "noninteractive").env("APT_LISTCHANGES_FRONTEND", "none").env("LC_ALL", "C.UTF-8");
        c.args(["-y", "-q", "-o", &format!("DPkg::Lock::Timeout={}", self.lock_timeout_s)]);
        c.args(["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]);
        for o in &self.options {
            c.args(["-o", o]);
        }
        c
    }

    fn op_args(op: &Op, allow_downgrades: bool) -> Vec<String> {
        Self::op_args_with(op, allow_downgrades, &[])
    }

    /// With packages from local files (rebuilt from deltas): each replaces the spec of the same
    /// package, and the rest still come from the repositories (dependencies resolve as usual).
    fn op_args_with(op: &Op, allow_downgrades: bool, local: &[LocalDeb]) -> Vec<String> {
        let mut args = Vec::new();
        match op {
            Op::Install(specs) | Op::Upgrade(specs) => {
                args.push("install".into());
                if matches!(op, Op::Upgrade(_)) {
                    args.push("--only-upgrade".into());
                }
                if allow_downgrades {
                    args.push("--allow-downgrades".into());
                }
                args.extend(specs.iter().filter(|s| !local.iter().any(|l| l.package == s.name)).map(Spec::arg));
                args.extend(local.iter().map(|l| l.path.to_string_lossy().into_owned()));
            }
            Op::Remove { names, purge } => {
                args.push(if *purge { "purge".into() } else { "remove".into() });
                args.extend(names.iter().map(|s| s.name.clone()));
            }
        }
        args
    }

    /// The full command line of a transaction, for running it elsewhere (a transient unit).
    pub fn argv(&self, op: &Op, allow_downgrades: bool) -> Vec<String> {
        let cmd = self.base();
        let mut argv: Vec<String> = vec![cmd.get_program().to_string_lossy().into_owned()];
        argv.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        argv.extend(Self::op_args(op, allow_downgrades));
        argv
    }

    /// What the transaction would do, without doing it.
    pub fn simulate(&self, op: &Op, allow_downgrades: bool) -> Result<Changes, AptError> {
        let mut cmd = self.base();
        cmd.arg("-s").args(Self::op_args(op, allow_downgrades));
        let out = output(&mut cmd)?;
        if !out.0 {
            return Err(classify(&out.1, &[]));
        }
        Ok(simulate::parse(&out.1))
    }

    /// Fetches what the transaction needs into apt's cache, changing nothing else (the run that
    /// follows then downloads nothing): what apt said it would fetch, and what it fetched.
    pub fn download(&self, op: &Op, allow_downgrades: bool, local: &[LocalDeb]) -> Result<Report, AptError> {
        let mut cmd = self.base();
        cmd.arg("--download-only").args(Self::op_args_with(op, allow_downgrades, local));
        let (ok, text) = output(&mut cmd)?;
        if !ok {
            return Err(classify(&text, &[]));
        }
        Ok(Report { download_bytes: need_to_get(&text), downloads: downloads(&text), conffiles_kept: Vec::new() })
    }

    /// Upgrades available from the device's apt lists for these packages: name → (installed,
    /// candidate). Packages that are not installed or already newest are left out.
    pub fn upgradable(&self, names: &[Spec]) -> Result<std::collections::BTreeMap<String, (String, String)>, AptError> {
        if names.is_empty() {
            return Ok(Default::default());
        }
        let plan = self.simulate(&Op::Upgrade(names.to_vec()), false)?;
        Ok(plan
            .upgrade
            .into_iter()
            .filter(|(n, _, _)| names.iter().any(|s| &s.name == n))
            .map(|(n, o, v)| (n, (o, v)))
            .collect())
    }

    /// `apt-get update`, failing on any repository error (a wrong key included). Returns the
    /// bytes it fetched, and what they would have been without index diffs.
    pub fn update(&self) -> Result<UpdateBytes, AptError> {
        let mut cmd = self.base();
        cmd.args(["-o", "APT::Update::Error-Mode=any", "update"]);
        let (ok, text) = output(&mut cmd)?;
        if ok {
            Ok(update_bytes(&text, std::path::Path::new("/var/lib/apt/lists")))
        } else {
            Err(classify(&text, &[]))
        }
    }

    /// Where apt would download these package versions from, and their sizes:
    /// (name, version) → (URI, size), from `apt-get download --print-uris`.
    pub fn download_uris(
        &self,
        versions: &[(String, String)],
    ) -> std::collections::BTreeMap<(String, String), (String, u64)> {
        let mut out = std::collections::BTreeMap::new();
        if versions.is_empty() {
            return out;
        }
        let mut cmd = command(&self.apt_get);
        cmd.env("LC_ALL", "C.UTF-8")
            .args(["-qq", "--print-uris", "download"])
            .args(versions.iter().map(|(n, v)| format!("{n}={v}")));
        let Ok((_, text)) = output(&mut cmd) else { return out };
        for line in text.lines() {
            // 'URI' NAME_VERSION_ARCH.deb SIZE SHA256:HASH
            let mut w = line.split_whitespace();
            let (Some(uri), Some(file), Some(size)) = (w.next(), w.next(), w.next()) else { continue };
            let uri = uri.trim_matches('\'');
            let Some((name, rest)) = file.strip_suffix(".deb").and_then(|f| f.split_once('_')) else { continue };
            let Some((version, _arch)) = rest.rsplit_once('_') else { continue };
            let version = version.replace("%3a", ":");
            if let (Ok(size), true) = (size.parse(), versions.iter().any(|(n, v)| n == name && *v == version)) {
                out.insert((name.to_owned(), version), (uri.to_owned(), size));
            }
        }
        out
    }

    /// The files apt fetched for an index target (`Identifier`), with the base URI of the
    /// repository each came from (`http://host/dists/SUITE/`).
    pub fn index_target_files(&self, identifier: &str) -> Vec<(std::path::PathBuf, String)> {
        let mut cmd = command(&self.apt_get);
        cmd.env("LC_ALL", "C.UTF-8").args([
            "indextargets",
            "--format",
            "$(FILENAME)\t$(BASE_URI)",
            &format!("Identifier: {identifier}"),
        ]);
        let Ok((true, text)) = output(&mut cmd) else { return Vec::new() };
        text.lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(f, b)| (std::path::PathBuf::from(f.trim()), b.trim().to_owned()))
            .filter(|(f, b)| f.is_absolute() && !b.is_empty())
            .collect()
    }

    /// Repairs what an interrupted dpkg left (`dpkg --configure -a`, then `apt-get -f install`).
    /// Returns whether anything needed repair.
    pub fn recover(&self) -> Result<bool, AptError> {
        let (_, audit) = output(command(&self.dpkg).arg("--audit"))?;
        if audit.trim().is_empty() {
            return Ok(false);
        }
        let mut configure = command(&self.dpkg);
        configure.env("DEBIAN_FRONTEND", "noninteractive").args([
            "--force-confdef",
            "--force-confold",
            "--configure",
            "-a",
        ]);
        let (ok, text) = output(&mut configure)?;
        let mut fix = self.base();
        fix.args(["-f", "install"]);
        let (fixed, fix_text) = output(&mut fix)?;
        if !ok && !fixed {
            return Err(classify(&format!("{text}\n{fix_text}"), &[]));
        }
        Ok(true)
    }

    /// Runs the transaction, reporting progress as apt goes.
    pub fn run(
        &self,
        op: &Op,
        allow_downgrades: bool,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Report, AptError> {
        self.run_with(op, allow_downgrades, &[], on_progress)
    }

    /// Runs the transaction with some packages from local files.
    pub fn run_with(
        &self,
        op: &Op,
        allow_downgrades: bool,
        local: &[LocalDeb],
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Report, AptError> {
        let mut cmd = self.base();
        cmd.args(["-o", "APT::Status-Fd=3"]).args(Self::op_args_with(op, allow_downgrades, local));
        let (read_end, write_end) = pipe()?;
        let write_fd = write_end.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls: dup2 onto fd 3 (which also
        // clears close-on-exec for the copy).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(write_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| io_err(&self.apt_get.join(" "), e))?;
        drop(write_end);
        // Output is collected on threads so that neither pipe can fill up and stall apt.
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut dpkg_errors = Vec::new();
        let mut conffiles = Vec::new();
        let status_file = std::fs::File::from(read_end);
        for line in BufReader::new(status_file).lines() {
            let Ok(line) = line else { break };
            match status::parse(&line) {
                Status::Download { percent, text } => {
                    on_progress(Progress { phase: debfleet_protocol::Phase::Downloading, percent, package: None, text })
                }
                Status::Package { package, percent, text } => {
                    on_progress(Progress { phase: status::phase_of(&text), percent, package: Some(package), text })
                }
                Status::Error { package, message } => dpkg_errors.push(format!("{package}: {message}")),
                Status::Conffile { path } => conffiles.push(path),
                Status::Other(_) => {}
            }
        }
        let status = child.wait().map_err(|e| io_err(&self.apt_get.join(" "), e))?;
        let text = format!("{}\n{}", out_thread.join().unwrap_or_default(), err_thread.join().unwrap_or_default());
        if !status.success() {
            return Err(classify(&text, &dpkg_errors));
        }
        Ok(Report { download_bytes: need_to_get(&text), downloads: downloads(&text), conffiles_kept: conffiles })
    }
}

fn command(argv: &[String]) -> Command {
    let mut c = Command::new(argv.first().map(String::as_str).unwrap_or("false"));
    c.args(&argv[1.min(argv.len())..]);
    c
}

fn io_err(command: &str, e: std::io::Error) -> AptError {
    AptError::Io { command: command.to_owned(), message: e.to_string() }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), AptError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors on success; we take ownership of them right away.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io_err("pipe2", std::io::Error::last_os_error()));
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Runs a command to completion; returns (success, stdout + stderr).
fn output(cmd: &mut Command) -> Result<(bool, String), AptError> {
    let name = format!("{:?}", cmd.get_program());
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| io_err(&name, e))?;
    Ok((
        out.status.success(),
        format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_validated() {
        assert_eq!(
            Spec::parse("hello=2.10-3").unwrap(),
            Spec { name: "hello".into(), version: Some("2.10-3".into()), release: None }
        );
        let from_suite = Spec { release: Some("stable".into()), ..Spec::named("hello") };
        assert_eq!(
            Apt::op_args(&Op::Install(vec![from_suite]), true),
            ["install", "--allow-downgrades", "hello/stable"]
        );
        assert_eq!(Spec::parse("hello").unwrap().version, None);
        for bad in ["Hello", "hello=", "hello=1 2", "-o=x", "hello;rm", "--purge", "a=b=c"] {
            assert!(Spec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arguments_never_pass_through_a_shell() {
        let args = Apt::op_args(&Op::Install(vec![Spec::parse("hello=1.0").unwrap()]), true);
        assert_eq!(args, ["install", "--allow-downgrades", "hello=1.0"]);
        let args = Apt::op_args(&Op::Remove { names: vec![Spec::parse("hello").unwrap()], purge: true }, false);
        assert_eq!(args, ["purge", "hello"]);
    }

    #[test]
    fn downloads_are_read_from_the_get_lines() {
        let out = "Get:1 http://127.0.0.1:8080 stable/main amd64 demo-app all 1.0 [1,234 B]\n\
                   Get:2 /var/lib/debfleet/fetch/x_2.0_all.deb x all 2.0 [5,000 B]\n\
                   Get:3 http://deb.debian.org/debian bookworm/main amd64 sl amd64 5.02-1+b1 [12.1 kB]\n";
        assert_eq!(
            downloads(out),
            [("demo-app".to_owned(), "1.0".to_owned(), 1234), ("sl".to_owned(), "5.02-1+b1".to_owned(), 12_100)]
        );
    }

    #[test]
    fn index_diffs_are_credited_with_the_whole_index_they_replaced() {
        let lists = tempfile::tempdir().unwrap();
        std::fs::write(
            lists.path().join("127.0.0.1:18991_dists_stable_InRelease"),
            "SHA256:\n 0a 13300 main/binary-amd64/Packages.xz\n 0b 15000 main/binary-amd64/Packages.gz\n 0c 90000 main/binary-amd64/Packages\n",
        )
        .unwrap();
        let out = "Get:1 http://127.0.0.1:18991 stable InRelease [2356 B]\n\
                   Get:2 http://127.0.0.1:18991 stable/main amd64 Packages.diff/Index [492 B]\n\
                   Get:3 http://127.0.0.1:18991 stable/main amd64 Packages T-fde9-F-68b3.pdiff [199 B]\n\
                   Get:3 http://127.0.0.1:18991 stable/main amd64 Packages T-fde9-F-68b3.pdiff [199 B]\n\
                   Fetched 3047 B in 0s (15.1 kB/s)\n";
        assert_eq!(
            update_bytes(out, lists.path()),
            UpdateBytes { fetched: 3047, without_diffs: 3047 - 492 - 199 + 13300 }
        );
        let whole = "Get:1 http://127.0.0.1:18991 stable InRelease [2356 B]\n\
                     Get:2 http://127.0.0.1:18991 stable/main amd64 Packages [13.3 kB]\nFetched 15.7 kB in 0s (98.2 kB/s)\n";
        assert_eq!(update_bytes(whole, lists.path()), UpdateBytes { fetched: 15_700, without_diffs: 15_700 });
    }

    #[test]
    fn need_to_get_sizes() {
        assert_eq!(need_to_get("Need to get 740 B of archives."), 740);
        assert_eq!(need_to_get("Need to get 1,234 kB of archives."), 1_234_000);
        assert_eq!(need_to_get("Need to get 0 B/2,048 kB of archives."), 0);
        assert_eq!(need_to_get("nothing"), 0);
    }
}
