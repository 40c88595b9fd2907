//! Harness for repository tests: a `debfleet-repo` server in a temporary root, .debs built with
//! the real `dpkg-deb`, an apt sandbox on the host (its own sources, keyring, lists and dpkg
//! root) running the real `apt-get`, and a raw HTTP client for hostile requests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{bin, free_port, wait_for};

pub struct RepoServer {
    pub root: PathBuf,
    pub port: u16,
    pub token: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RepoServer {
    pub fn start(init_args: &[&str]) -> RepoServer {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let out =
            Command::new(bin("debfleet-repo")).arg("init").arg("--root").arg(&root).args(init_args).output().unwrap();
        assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout).unwrap().lines().last().unwrap().trim().to_owned();
        assert!(token.starts_with("dfr_"), "{token}");
        let mut s = RepoServer { root, port: free_port(), token, dir, child: None };
        s.spawn(None);
        s
    }

    /// Starts the server; with `failpoint`, the process aborts at that point of a publish.
    pub fn spawn(&mut self, failpoint: Option<&str>) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(bin("debfleet-repo"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port), "--root"]).arg(&self.root);
        cmd.env_remove("DEBFLEET_REPO_FAILPOINT");
        if let Some(f) = failpoint {
            cmd.env("DEBFLEET_REPO_FAILPOINT", f);
        }
        self.child = Some(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap());
        let port = self.port;
        wait_for(Duration::from_secs(20), "the repository server", || TcpStream::connect(("127.0.0.1", port)).ok());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for a server that is expected to die by itself (a failpoint).
    pub fn wait_dead(&mut self) {
        let child = self.child.as_mut().unwrap();
        wait_for(Duration::from_secs(20), "the server to die", || child.try_wait().unwrap());
        self.child = None;
    }

    /// Runs the console against this repository.
    pub fn console(&self, args: &[&str]) -> Output {
        Command::new(bin("debfleet"))
            .args(args)
            .env("DEBFLEET_REPO", self.url())
            .env("DEBFLEET_TOKEN", &self.token)
            .env("DEBFLEET_CONFIG", "/nonexistent")
            .output()
            .unwrap()
    }

    pub fn publish(&self, deb: &Path, suite: &str) -> Output {
        self.console(&["publish", deb.to_str().unwrap(), "--suite", suite, "--json"])
    }

    /// Every (suite, name, version, arch) the API lists.
    pub fn listing(&self) -> Vec<(String, String, String, String)> {
        let out = self.console(&["packages", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut list = Vec::new();
        for s in v.as_array().unwrap() {
            for p in s["packages"].as_array().unwrap() {
                for ver in p["versions"].as_array().unwrap() {
                    list.push((
                        s["suite"].as_str().unwrap().to_owned(),
                        p["name"].as_str().unwrap().to_owned(),
                        ver["version"].as_str().unwrap().to_owned(),
                        ver["arch"].as_str().unwrap().to_owned(),
                    ));
                }
            }
        }
        list.sort();
        list
    }

    /// Files in the pool, relative to it.
    pub fn pool_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.join("public/pool")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for RepoServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Builds a .deb with dpkg-deb. `control_extra` is appended to the control file; `nocheck`
/// lets hostile control data through (dpkg-deb --nocheck), as an attacker's tool would.
pub fn build_deb(dir: &Path, name: &str, version: &str, arch: &str, control_extra: &str, nocheck: bool) -> PathBuf {
    build_deb_with_scripts(dir, name, version, arch, control_extra, nocheck, &[])
}

/// Like [`build_deb`], with maintainer scripts (name, shell body after `set -e`).
pub fn build_deb_with_scripts(
    dir: &Path,
    name: &str,
    version: &str,
    arch: &str,
    control_extra: &str,
    nocheck: bool,
    scripts: &[(&str, &str)],
) -> PathBuf {
    let stage = dir.join(format!("stage-{name}-{version}-{arch}-{}", crate::rand_u32()));
    std::fs::create_dir_all(stage.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(stage.join(format!("usr/share/{name}"))).unwrap();
    std::fs::write(stage.join(format!("usr/share/{name}/version")), format!("{version}\n")).unwrap();
    let control = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: Ops <ops@example.com>\nDescription: test package {name}\n built by the debfleet tests\n{control_extra}"
    );
    std::fs::write(stage.join("DEBIAN/control"), control).unwrap();
    for (script, body) in scripts {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.join("DEBIAN").join(script);
        std::fs::write(&path, format!("#!/bin/sh\nset -e\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = dir.join(format!("{name}_{version}_{arch}-{}.deb", crate::rand_u32()));
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("--build").arg("--root-owner-group").arg("-Zgzip");
    if nocheck {
        cmd.arg("--nocheck");
    }
    let res = cmd.arg(&stage).arg(&out).output().unwrap();
    assert!(res.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&res.stderr));
    out
}

/// A package whose versions differ a little in a large payload, as real updates do: 256 KiB
/// of fixed pseudo-random data with a few bytes changed per version (compressed with xz, as
/// Debian does), and a changelog compressed with `gzip -9n` that grows by an entry per version.
pub fn bulky_deb(dir: &Path, name: &str, version: &str) -> PathBuf {
    let stage = dir.join(format!("stage-{name}-{version}-{}", crate::rand_u32()));
    let share = stage.join(format!("usr/share/{name}"));
    let doc = stage.join(format!("usr/share/doc/{name}"));
    for d in [stage.join("DEBIAN"), share.clone(), doc.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data: Vec<u8> = (0..256 * 1024)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    let seed: usize = version.bytes().map(usize::from).sum();
    for i in 0..64 {
        let at = (seed * 7919 + i * 4099) % data.len();
        data[at] = data[at].wrapping_add(1);
    }
    std::fs::write(share.join("data"), &data).unwrap();
    std::fs::write(share.join("version"), format!("{version}\n")).unwrap();
    let changelog: String = (0..40)
        .map(|i| {
            format!("{name} ({version}-{i}) stable; urgency=low\n\n  * Change number {i} of version {version}.\n\n")
        })
        .collect();
    let gz = Command::new("sh")
        .arg("-c")
        .arg("gzip -9n > \"$1\"")
        .arg("sh")
        .arg(doc.join("changelog.gz"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(changelog.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(gz.success());
    std::fs::write(
        stage.join("DEBIAN/control"),
        format!("Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Ops <ops@example.com>\nDescription: bulky test package\n"),
    )
    .unwrap();
    let out = dir.join(format!("{name}_{version}_all.deb"));
    let res = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&stage)
        .arg(&out)
        .output()
        .unwrap();
    assert!(res.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&res.stderr));
    out
}

/// apt on the host, confined to a directory: its own sources, keyring, lists, cache and a dpkg
/// root where packages really get installed.
pub struct AptSandbox {
    pub dir: tempfile::TempDir,
}

impl AptSandbox {
    pub fn new(repo_url: &str, suite: &str, keyring: &[u8]) -> AptSandbox {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in [
            "etc/apt/apt.conf.d",
            "etc/apt/preferences.d",
            "etc/apt/sources.list.d",
            "etc/apt/trusted.gpg.d",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/log/apt",
            "root/var/lib/dpkg/info",
            "root/var/lib/dpkg/updates",
            "root/var/lib/dpkg/triggers",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("root/var/lib/dpkg/status"), "").unwrap();
        std::fs::write(d.join("keyring.gpg"), keyring).unwrap();
        std::fs::write(
            d.join("etc/apt/sources.list"),
            format!("deb [signed-by={}] {repo_url}/ {suite} main\n", d.join("keyring.gpg").display()),
        )
        .unwrap();
        AptSandbox { dir }
    }

    /// Adds apt configuration (as a file apt reads through APT_CONFIG).
    pub fn configure(&self, text: &str) {
        std::fs::write(self.dir.path().join("apt.conf"), text).unwrap();
    }

    /// The lists file apt keeps for an index target ("Packages", "Deltas").
    pub fn list(&self, suffix: &str) -> Option<Vec<u8>> {
        let lists = self.dir.path().join("var/lib/apt/lists");
        let f = std::fs::read_dir(lists).ok()?.flatten().find(|f| {
            let n = f.file_name().to_string_lossy().into_owned();
            n.ends_with(&format!("_binary-amd64_{suffix}"))
        })?;
        std::fs::read(f.path()).ok()
    }

    fn apt(&self, args: &[&str]) -> Output {
        let d = self.dir.path().display().to_string();
        let mut cmd = Command::new("apt-get");
        let conf = self.dir.path().join("apt.conf");
        if conf.exists() {
            cmd.env("APT_CONFIG", conf);
        }
        cmd.args([
            "-q",
            "-o",
            &format!("Dir={d}"),
            "-o",
            &format!("Dir::State::status={d}/root/var/lib/dpkg/status"),
            "-o",
            &format!("Dir::Log={d}/var/log/apt"),
            "-o",
            "APT::Update::Error-Mode=any",
            // apt's defaults, as on a device; this build machine's own apt configuration turns
            // them off for its mirror (Check-Date off turns Valid-Until off too), and apt reads
            // that before these options.
            "-o",
            "Acquire::Check-Date=true",
            "-o",
            "Acquire::Check-Valid-Until=true",
            "-o",
            "Debug::NoLocking=1",
            "-o",
            "APT::Architecture=amd64",
            // Lists uncompressed, as on a device (this machine's apt may keep them compressed).
            "-o",
            "Acquire::GzipIndexes=false",
            "-o",
            &format!("DPkg::Options::=--root={d}/root"),
            "-o",
            "DPkg::Options::=--force-not-root",
        ])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap()
    }

    pub fn update(&self) -> Output {
        self.apt(&["update"])
    }

    pub fn install(&self, spec: &str) -> Output {
        self.apt(&["install", "-y", "--allow-downgrades", spec])
    }

    /// The version dpkg (in the sandbox root) has installed.
    pub fn installed(&self, name: &str) -> Option<String> {
        let out = Command::new("dpkg-query")
            .arg(format!("--admindir={}/root/var/lib/dpkg", self.dir.path().display()))
            .args(["-W", "-f=${Version}", name])
            .output()
            .unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned()).filter(|v| !v.is_empty())
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A raw HTTP/1.1 request; returns the status code and body. For requests no well-behaved
/// client would send.
pub fn raw_http(port: u16, head: &str, body: &[u8], send_all: bool) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    if !send_all {
        // A client that promised more than it sent and went away.
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let (code, _, body) = read_response(&mut s);
    (code, body)
}

/// The status code, head and body of the response on `s` (read to its end).
fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (code, head.to_owned(), body.to_owned())
}

/// One HTTP/1.1 request to the web console on loopback: status, head, body.
fn web_request(port: u16, method: &str, path: &str, cookie: &str, form: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    read_response(&mut s)
}

/// `CONSOLE web user add NAME --role ROLE --users USERS`, the password on stdin.
pub fn add_web_user(console: &Path, users: &Path, name: &str, role: &str, password: &str) {
    let mut add = Command::new(console)
        .args(["web", "user", "add", name, "--role", role, "--users"])
        .arg(users)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    add.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    assert!(add.wait().unwrap().success(), "adding web user {name}");
}

/// The web console's page at `path` as `user` sees it, signed in with `password` (no browser:
/// for tests that only need to know the console is there and shows the fleet).
pub fn web_page_as(port: u16, user: &str, password: &str, path: &str) -> String {
    let (code, head, body) = web_request(port, "POST", "/login", "", &format!("user={user}&password={password}"));
    assert_eq!(code, 303, "signing in as {user}: {head}\n{body}");
    let cookie = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().starts_with("set-cookie:").then(|| l[11..].trim().to_owned()))
        .and_then(|c| c.split(';').next().map(str::to_owned))
        .expect("a session cookie");
    let (code, head, body) = web_request(port, "GET", path, &cookie, "");
    assert_eq!(code, 200, "{path}: {head}\n{body}");
    body
}

pub fn upload_head(suite: &str, token: &str, len: usize) -> String {
    format!(
        "POST /api/v1/suites/{suite}/packages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

/// A package NAME at `version` with one service, `NAME.service`, built with `debfleet package`:
/// a service that runs, or (broken) exits at once and is restarted by systemd.
pub fn service_deb(dir: &Path, name: &str, version: &str, broken: bool) -> PathBuf {
    let d = dir.join(format!("{name}-{version}"));
    std::fs::create_dir_all(&d).unwrap();
    let body = if broken { "echo broken >&2; exit 1" } else { "exec sleep infinity" };
    std::fs::write(d.join(name), format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::write(
        d.join(format!("{name}.service")),
        format!("[Unit]\nDescription={name}\n\n[Service]\nExecStart=/usr/bin/{name}\nRestart=on-failure\nRestartSec=300ms\n\n[Install]\nWantedBy=multi-user.target\n"),
    )
    .unwrap();
    std::fs::write(
        d.join("manifest.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"{version}\"\narchitecture = \"all\"\nmaintainer = \"Ops <ops@example.com>\"\ndescription = \"{name}, a test service\"\n\n[[files]]\nsource = \"{name}\"\ndest = \"/usr/bin/{name}\"\nmode = \"0755\"\n\n[[units]]\nsource = \"{name}.service\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(bin("debfleet"))
        .arg("package")
        .arg(d.join("manifest.toml"))
        .arg("--out")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.join(format!("{name}_{version}_all.deb"))
}

/// A plain static file server over a copy of a repository's files (what a mirror or an attacker
/// replaying an old state serves): GET only, one request per connection. Stops with the process.
pub fn serve_files(dir: &Path) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split(' ').nth(1).unwrap_or("/").trim_start_matches('/').to_owned();
                let file = (!path.split('/').any(|c| c == "..")).then(|| std::fs::read(dir.join(&path)).ok()).flatten();
                let reply = match file {
                    Some(body) => {
                        let mut r =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                                .into_bytes();
                        r.extend(body);
                        r
                    }
                    None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                };
                let _ = conn.write_all(&reply);
            });
        }
    });
    port
}
