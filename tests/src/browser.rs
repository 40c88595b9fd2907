//! A real browser for the web console's tests: Debian's headless Chromium driven over
//! WebDriver (chromedriver), with the few W3C WebDriver calls the tests use, over a plain
//! HTTP/1.1 connection to the driver on loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver and one browser session; both go away on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// Whether this machine has Chromium and its driver (the README's test command installs them).
pub fn available() -> bool {
    std::path::Path::new("/usr/bin/chromium").exists() && std::path::Path::new("/usr/bin/chromedriver").exists()
}

fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("chromedriver: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    // chromedriver may keep the connection open: read the head, then what it says follows.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let (head, mut rest) = loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("chromedriver closed the connection without an answer".into());
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&raw[..i]).into_owned(), raw[i + 4..].to_vec());
        }
    };
    let lower = head.to_ascii_lowercase();
    let length =
        lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    loop {
        let done = match length {
            Some(n) => rest.len() >= n,
            None if chunked => rest.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        rest.extend_from_slice(&buf[..n]);
    }
    let rest = String::from_utf8_lossy(&rest).into_owned();
    let body = if chunked { dechunk(&rest) } else { rest };
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("chromedriver said {body:?}: {e}"))?;
    if head.starts_with("HTTP/1.1 200") {
        Ok(v["value"].clone())
    } else {
        Err(format!("{method} {path}: {}", v["value"]))
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn b64(text: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = text.bytes().filter_map(val).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().fold(0u32, |acc, d| acc << 6 | u32::from(*d)) << (6 * (4 - chunk.len()));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

impl Browser {
    pub fn start() -> Browser {
        Browser::start_with(&[])
    }

    /// With more Chromium flags (`--ignore-certificate-errors` for a self-signed test server).
    pub fn start_with(extra: &[&str]) -> Browser {
        let port = crate::free_port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http(port, "GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        // Without the background-networking flags Chromium keeps trying to reach Google's hosts,
        // which this machine's closed network refuses.
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let session = http(port, "POST", "/session", Some(&caps)).expect("a browser session");
        let session = session["sessionId"].as_str().expect("a session id").to_owned();
        Browser { driver, port, session, _profile: profile }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        http(self.port, method, &path, body.as_ref()).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({"url": url})));
    }

    pub fn url(&self) -> String {
        self.call("GET", "/url", None).as_str().unwrap_or_default().to_owned()
    }

    fn find(&self, css: &str) -> Option<String> {
        let path = format!("/session/{}/element", self.session);
        let v = http(self.port, "POST", &path, Some(&json!({"using": "css selector", "value": css}))).ok()?;
        v[ELEMENT].as_str().map(str::to_owned)
    }

    /// Waits up to 30 s for the element.
    pub fn element(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self.find(css) {
                return e;
            }
            assert!(Instant::now() < deadline, "no {css} on {}: {}", self.url(), self.text("body"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn exists(&self, css: &str) -> bool {
        self.find(css).is_some()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/value"), Some(json!({"text": text})));
    }

    /// Empties a field, then types into it.
    pub fn replace_text(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/clear"), Some(json!({})));
        self.call("POST", &format!("/element/{e}/value"), Some(json!({"text": text})));
    }

    /// Clicks something that loads another page (a form's button, a link), and waits until the
    /// new page has loaded, so that what is read next is read from it.
    pub fn click_and_load(&self, css: &str) {
        self.script("window.debfleetOldPage = true;");
        self.click(css);
        self.wait(Duration::from_secs(30), "the next page", |b| {
            b.script("return window.debfleetOldPage === undefined && document.readyState === 'complete';") == true
        });
    }

    pub fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    /// A GET about the element `css` finds (`what`: `text`, `attribute/NAME`). The pages swap
    /// parts in place as updates come, so an element found may be replaced before it is read:
    /// then it is found again.
    fn read(&self, css: &str, what: &str) -> Option<Value> {
        for _ in 0..20 {
            let e = self.find(css)?;
            let path = format!("/session/{}/element/{e}/{what}", self.session);
            match http(self.port, "GET", &path, None) {
                Ok(v) => return Some(v),
                Err(err) if err.contains("stale element") => std::thread::sleep(Duration::from_millis(50)),
                Err(err) => panic!("{err}"),
            }
        }
        panic!("{css} kept being replaced on {}", self.url())
    }

    pub fn text(&self, css: &str) -> String {
        self.read(css, "text").and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }

    pub fn attribute(&self, css: &str, name: &str) -> String {
        self.element(css);
        self.read(css, &format!("attribute/{name}")).and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }

    /// Runs a script in the page (its `return` value back); `async` scripts call `done(value)`.
    pub fn script(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({"script": script, "args": []})))
    }

    pub fn script_async(&self, body: &str) -> Value {
        let script = format!("const done = arguments[arguments.length - 1]; {body}");
        self.call("POST", "/execute/async", Some(json!({"script": script, "args": []})))
    }

    pub fn select(&self, css: &str, value: &str) {
        let js = format!(
            "const s = document.querySelector({}); s.value = {}; return s.value;",
            serde_json::to_string(css).unwrap(),
            serde_json::to_string(value).unwrap()
        );
        assert_eq!(self.script(&js), value);
    }

    /// The browser's cookies for the current page (HttpOnly ones too).
    pub fn cookies(&self) -> Vec<Value> {
        self.call("GET", "/cookie", None).as_array().cloned().unwrap_or_default()
    }

    pub fn clear_cookies(&self) {
        self.call("DELETE", "/cookie", None);
    }

    /// Waits up to `timeout` for `f` to hold, polling; panics with `what` after.
    pub fn wait(&self, timeout: Duration, what: &str, f: impl Fn(&Browser) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what} on {}: {}", self.url(), self.text("main"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A PNG of the page as it is now, written to `path`.
    pub fn screenshot(&self, path: &std::path::Path) {
        let data = self.call("GET", "/screenshot", None);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, b64(data.as_str().unwrap_or_default())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(self.port, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_and_chunks_decode() {
        assert_eq!(super::b64("aGVsbG8="), b"hello");
        assert_eq!(super::b64("aGk="), b"hi");
        assert_eq!(super::dechunk("5\r\nhello\r\n3\r\n!!!\r\n0\r\n\r\n"), "hello!!!");
    }
}
