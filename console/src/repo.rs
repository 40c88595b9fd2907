//! The publishing side of the console: talks to `debfleet-repo`'s API.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::Digest;

use crate::cmds::usage;
use crate::output::table;

/// Where the repository is and what the console may send it.
#[derive(Debug, Clone)]
pub struct RepoAccess {
    pub url: String,
    /// The publish token (`Authorization: Bearer`), for publish, promote and unpublish.
    pub token: Option<String>,
    /// Send the token over plain `http://` to another machine (`--insecure`).
    pub insecure: bool,
}

pub struct RepoClient {
    url: String,
    token: Option<String>,
    insecure: bool,
    agent: ureq::Agent,
    /// A progress bar on a terminal's stderr during uploads (not for a server's uploads).
    progress: bool,
}

impl RepoClient {
    pub fn new(access: Option<RepoAccess>) -> Result<RepoClient> {
        let RepoAccess { url, token, insecure } = access.ok_or_else(|| {
            usage("no repository: pass --repo URL, set DEBFLEET_REPO, or put repo = \"...\" in the console config")
        })?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!(usage(format!("repository URL {url:?} must start with http:// or https://")));
        }
        let agent = ureq::AgentBuilder::new().timeout_connect(std::time::Duration::from_secs(10)).build();
        Ok(RepoClient { url: url.trim_end_matches('/').to_owned(), token, insecure, agent, progress: true })
    }

    /// Without the upload progress bar.
    pub fn quiet(self) -> RepoClient {
        RepoClient { progress: false, ..self }
    }

    /// The publish token, for a request that sends it: refused over plain `http://` to another
    /// machine unless `--insecure` (then said on stderr), since anyone on the way could read it.
    fn token(&self) -> Result<&str> {
        let token = self.token.as_deref().ok_or_else(|| {
            usage("no publish token: pass --token, set DEBFLEET_TOKEN, or put token = \"...\" in the console config")
        })?;
        if let Some(host) = self.url.strip_prefix("http://").map(host_of).filter(|h| !is_loopback(h)) {
            if !self.insecure {
                bail!(usage(format!(
                    "refusing to send the publish token over plain http:// to {host}: anyone on the way could read it \
                     and publish as you; use https://, or --insecure to send it anyway"
                )));
            }
            eprintln!("debfleet: warning: sending the publish token over plain http:// to {host} (--insecure)");
        }
        Ok(token)
    }

    fn call(&self, req: ureq::Request, body: Option<Value>) -> Result<Value> {
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(&b.to_string()),
            None => req.call(),
        };
        read_response(res)
    }

    pub fn suites(&self) -> Result<Vec<String>> {
        let v = self.call(self.agent.get(&format!("{}/api/v1/suites", self.url)), None)?;
        Ok(v["suites"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
            .unwrap_or_default())
    }

    pub fn packages(&self, suite: &str) -> Result<Value> {
        check_suite(suite)?;
        self.call(self.agent.get(&format!("{}/api/v1/suites/{suite}/packages", self.url)), None)
    }

    pub fn upload(&self, path: &Path, suite: &str) -> Result<Value> {
        check_suite(suite)?;
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut reader = Progress::new(file, size, name);
        reader.tty &= self.progress;
        let req = self
            .agent
            .post(&format!("{}/api/v1/suites/{suite}/packages", self.url))
            .set("Authorization", &format!("Bearer {}", self.token()?))
            .set("Content-Type", "application/vnd.debian.binary-package")
            .set("Content-Length", &size.to_string());
        read_response(req.send(reader))
    }

    pub fn promote(&self, name: &str, version: &str, from: &str, to: &str) -> Result<Value> {
        check_suite(from)?;
        check_suite(to)?;
        let req = self
            .agent
            .post(&format!("{}/api/v1/promote", self.url))
            .set("Authorization", &format!("Bearer {}", self.token()?));
        self.call(req, Some(json!({"name": name, "version": version, "from": from, "to": to})))
    }

    pub fn remove(&self, name: &str, version: &str, suite: &str, arch: Option<&str>) -> Result<Value> {
        check_suite(suite)?;
        if arch.is_some_and(|a| !a.bytes().all(|b| b.is_ascii_alphanumeric())) {
            bail!(usage(format!("architecture {arch:?} is not valid")));
        }
        let mut url = format!("{}/api/v1/suites/{suite}/packages/{name}/{version}", self.url);
        if let Some(a) = arch {
            url.push_str(&format!("?arch={a}"));
        }
        let req = self.agent.delete(&url).set("Authorization", &format!("Bearer {}", self.token()?));
        self.call(req, None)
    }
}

/// The host of an URL without its scheme: `[::1]` stays bracketed, a port is cut.
fn host_of(rest: &str) -> &str {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn read_response(res: Result<ureq::Response, ureq::Error>) -> Result<Value> {
    match res {
        Ok(r) => {
            let body = r.into_string().context("reading the repository's answer")?;
            serde_json::from_str(&body).context("the repository answered with something that is not JSON")
        }
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(body);
            bail!("the repository refused ({code}): {msg}")
        }
        Err(e) => bail!("cannot reach the repository: {e}"),
    }
}

/// Counts bytes as ureq reads the file and draws a progress bar for a person at a terminal.
struct Progress<R> {
    inner: R,
    total: u64,
    done: u64,
    name: String,
    tty: bool,
    started: Instant,
    last_draw: Instant,
}

impl<R> Progress<R> {
    fn new(inner: R, total: u64, name: String) -> Self {
        let now = Instant::now();
        Progress { inner, total, done: 0, name, tty: std::io::stderr().is_terminal(), started: now, last_draw: now }
    }

    fn draw(&self) {
        let pct = if self.total == 0 { 100 } else { self.done * 100 / self.total };
        let filled = (pct / 5) as usize;
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(0.001) / 1e6;
        eprint!("\r{} [{}{}] {pct:>3}% {rate:.1} MB/s", self.name, "#".repeat(filled), " ".repeat(20 - filled));
        let _ = std::io::stderr().flush();
    }
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.tty && (self.last_draw.elapsed().as_millis() > 100 || n == 0 || self.done == self.total) {
            self.last_draw = Instant::now();
            self.draw();
            if self.done == self.total {
                eprintln!();
            }
        }
        Ok(n)
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Suite names go into URL paths: checked here so that `..` or `/` never reach one.
pub fn check_suite(suite: &str) -> Result<()> {
    if !debfleet_protocol::debian::valid_suite(suite) {
        bail!(usage(format!("suite {suite:?} must match [a-z0-9][a-z0-9.-]*")));
    }
    Ok(())
}

/// `NAME=VERSION`, both checked for Debian syntax before they go into a URL.
pub fn name_version(spec: &str) -> Result<(String, String)> {
    use debfleet_protocol::debian::{valid_package_name, valid_version};
    let (n, v) = spec.split_once('=').ok_or_else(|| usage(format!("{spec:?} is not NAME=VERSION")))?;
    if !valid_package_name(n) || !valid_version(v) {
        bail!(usage(format!("{spec:?} is not a valid Debian NAME=VERSION")));
    }
    Ok((n.to_owned(), v.to_owned()))
}

/// Uploads one .deb and checks that the repository stored exactly this file (its sha256): what
/// `debfleet publish` and the web console's upload do for each file. The repository's answer.
pub fn publish_one(client: &RepoClient, file: &Path, suite: &str) -> Result<Value> {
    let local = sha256_file(file)?;
    let v = client.upload(file, suite)?;
    if v["sha256"].as_str() != Some(local.as_str()) {
        bail!("{}: the repository stored sha256 {} but the local file is {local}", file.display(), v["sha256"]);
    }
    Ok(v)
}

pub fn publish(client: &RepoClient, files: &[PathBuf], suite: &str, json_out: bool) -> Result<u8> {
    check_suite(suite)?;
    // A token that may not be sent is a usage error for the whole command, not a failure per file.
    client.token()?;
    let mut results = Vec::new();
    let mut failed = false;
    for f in files {
        match publish_one(client, f, suite) {
            Ok(v) => {
                results.push(json!({"file": f, "ok": true, "result": v}));
            }
            Err(e) => {
                failed = true;
                eprintln!("debfleet: {}: {e:#}", f.display());
                results.push(json!({"file": f, "ok": false, "error": format!("{e:#}")}));
            }
        }
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .filter(|r| r["ok"] == true)
            .map(|r| {
                let v = &r["result"];
                let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
                vec![
                    s("name"),
                    s("version"),
                    s("arch"),
                    s("suite"),
                    s("status"),
                    s("sha256")[..12.min(s("sha256").len())].to_owned(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            print!("{}", table(&["PACKAGE", "VERSION", "ARCH", "SUITE", "STATUS", "SHA256"], &rows));
        }
    }
    Ok(if failed { crate::exit::FAILED } else { 0 })
}

pub fn packages(client: &RepoClient, suite: Option<&str>, json_out: bool) -> Result<u8> {
    let suites = match suite {
        Some(s) => vec![s.to_owned()],
        None => client.suites()?,
    };
    let mut all = Vec::new();
    for s in &suites {
        all.push(client.packages(s)?);
    }
    if json_out {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(0);
    }
    let mut rows = Vec::new();
    for s in &all {
        for p in s["packages"].as_array().into_iter().flatten() {
            for v in p["versions"].as_array().into_iter().flatten() {
                rows.push(vec![
                    s["suite"].as_str().unwrap_or("").to_owned(),
                    p["name"].as_str().unwrap_or("").to_owned(),
                    v["version"].as_str().unwrap_or("").to_owned(),
                    v["arch"].as_str().unwrap_or("").to_owned(),
                    v["size"].to_string(),
                ]);
            }
        }
    }
    if rows.is_empty() {
        println!("no packages");
    } else {
        print!("{}", table(&["SUITE", "PACKAGE", "VERSION", "ARCH", "SIZE"], &rows));
    }
    Ok(0)
}

/// The console's configuration file: `$DEBFLEET_CONFIG`, else `$XDG_CONFIG_HOME/debfleet/console.toml`,
/// else `~/.config/debfleet/console.toml`. Keys: `broker`, `ca_file`, `repo`, `token`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub broker: Option<String>,
    pub broker_user: Option<String>,
    pub broker_password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub repo: Option<String>,
    pub token: Option<String>,
}

impl ConsoleConfig {
    pub fn load() -> Result<ConsoleConfig> {
        let path = match std::env::var_os("DEBFLEET_CONFIG") {
            Some(p) => PathBuf::from(p),
            None => {
                let base = std::env::var_os("XDG_CONFIG_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
                match base {
                    Some(b) => b.join("debfleet/console.toml"),
                    None => return Ok(ConsoleConfig::default()),
                }
            }
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("console configuration {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConsoleConfig::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str, insecure: bool) -> RepoClient {
        RepoClient::new(Some(RepoAccess { url: url.into(), token: Some("dfr_secret".into()), insecure })).unwrap()
    }

    #[test]
    fn the_token_goes_over_plain_http_only_to_this_machine_unless_insecure() {
        for url in ["http://127.0.0.1:8080", "http://localhost:8080/", "http://[::1]:8080", "https://repo.lan"] {
            assert_eq!(client(url, false).token().unwrap(), "dfr_secret", "{url}");
        }
        for url in ["http://repo.lan:8080", "http://10.0.0.5", "http://user@repo.lan/", "http://[2001:db8::1]:80"] {
            let e = client(url, false).token().unwrap_err().to_string();
            assert!(
                e.contains("refusing to send the publish token over plain http://") && e.contains("--insecure"),
                "{url}: {e}"
            );
            assert_eq!(client(url, true).token().unwrap(), "dfr_secret", "{url}");
        }
        assert_eq!(host_of("user@[2001:db8::1]:80/x"), "2001:db8::1");
    }
}
