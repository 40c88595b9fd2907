//! The web console in a real browser (issue 15): headless Chromium, a real Mosquitto, a real
//! agent on this machine and one in a lab device. Sign-in; the fleet page lists them; an agent
//! killed turns `lost` on the open page without a reload; an install started from the page (its
//! dry run first) reaches `succeeded` and the package table follows; a viewer's action and a
//! forged form are refused with 403; the audit chain verifies and a tampered copy does not.
//! Screenshots of the pages go to `target/web-screenshots/`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use debfleet_tests::browser::{self, Browser};
use debfleet_tests::lab::Device;
use debfleet_tests::repo::{service_deb, RepoServer};
use debfleet_tests::*;

struct Web {
    child: Child,
}

impl Drop for Web {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn add_user(users: &std::path::Path, name: &str, role: &str, password: &str) {
    debfleet_tests::repo::add_web_user(&bin("debfleet"), users, name, role, password);
}

/// `debfleet web` with its users and audit log, on a free port; more arguments after.
fn start_web(m: &Mosquitto, users: &std::path::Path, audit: &std::path::Path, listen: &str, more: &[&str]) -> Web {
    let child = Command::new(bin("debfleet"))
        .args(["web", "--listen", listen, "--users"])
        .arg(users)
        .arg("--audit")
        .arg(audit)
        .args(more)
        .env("DEBFLEET_BROKER", m.url())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Web { child }
}

fn screenshots() -> std::path::PathBuf {
    bin("debfleet").parent().unwrap().parent().unwrap().join("web-screenshots")
}

fn sign_in(b: &Browser, base: &str, user: &str, password: &str) {
    b.go(&format!("{base}/login"));
    b.type_into("#user", user);
    b.type_into("#password", password);
    b.click("#sign-in");
    b.element("#fleet");
}

/// A POST from the page's own JavaScript, as a forged or hand-made form would send it.
fn post_from_page(b: &Browser, path: &str, fields: &str) -> u64 {
    let js = format!(
        "fetch({}, {{method: 'POST', credentials: 'same-origin', redirect: 'manual', body: new URLSearchParams({fields})}}).then(r => done(r.status), e => done('fetch failed: ' + e));",
        serde_json::to_string(path).unwrap()
    );
    let answer = b.script_async(&js);
    answer.as_u64().unwrap_or_else(|| panic!("POST {path}: {answer}"))
}

#[test]
fn the_fleet_live_in_a_browser_with_roles_csrf_and_an_audit_trail() {
    assert!(browser::available(), "needs chromium and chromium-driver (scripts/test.sh installs them)");
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    let repo = RepoServer::start(&[]);
    let work = tempfile::tempdir().unwrap();
    for v in ["1.0", "2.0"] {
        assert!(repo.publish(&service_deb(work.path(), "wb-app", v, false), "stable").status.success());
    }
    let mut host = Agent::start(AgentSpec { id: "web-1", port: m.port, groups: &["lab"], extra: "" });
    let dev = Device::boot("web-2");
    let config = format!(
        "broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\ngroups = [\"lab\"]\n\n[apt]\nwatch_s = 3\n\n[telemetry.cpu]\ninterval_s = 1\nthreshold = 0\n\n[logs]\nbatch_s = 1\n",
        m.url()
    );
    dev.install_agent(&config, &repo);
    for d in ["web-1", "web-2"] {
        obs.wait(&format!("debfleet/device/{d}/status"), Duration::from_secs(60), |v| v["state"] == "online");
    }

    let users = work.path().join("web-users");
    let audit = work.path().join("audit.log");
    add_user(&users, "ana", "operator", "operator-pw");
    add_user(&users, "vic", "viewer", "viewer-pw");
    let port = free_port();
    let repo_url = repo.url();
    let repo_args = ["--repo", repo_url.as_str(), "--token", repo.token.as_str()];
    let _web = start_web(&m, &users, &audit, &format!("127.0.0.1:{port}"), &repo_args);
    wait_for(Duration::from_secs(20), "the web console", || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    let base = format!("http://127.0.0.1:{port}");

    let b = Browser::start();
    // A page needs a session: to the sign-in form; a wrong password says so.
    b.go(&base);
    b.element("#sign-in");
    b.type_into("#user", "ana");
    b.type_into("#password", "wrong-password");
    b.click("#sign-in");
    b.wait(Duration::from_secs(10), "the refusal", |b| b.text("#error").contains("wrong user name or password"));
    sign_in(&b, &base, "ana", "operator-pw");
    b.wait(Duration::from_secs(20), "both devices online", |b| {
        b.text("#dev-web-1").contains("online") && b.text("#dev-web-2").contains("online")
    });
    b.screenshot(&screenshots().join("fleet.png"));

    // The agent is killed: its row turns lost on the open page, with no reload.
    b.script("window.notReloaded = 42;");
    host.kill9();
    b.wait(Duration::from_secs(30), "web-1 to turn lost", |b| b.attribute("#dev-web-1", "class") == "status-lost");
    assert_eq!(b.script("return window.notReloaded;"), 42, "the page was reloaded");
    assert!(b.text("#dev-web-1").contains("lost"));
    assert!(b.text("#counts").contains("1 lost"), "{}", b.text("#counts"));
    b.screenshot(&screenshots().join("fleet-lost.png"));

    // An install from the device page: what will happen and the device's dry run first.
    b.go(&format!("{base}/device/web-2"));
    b.select("#verb", "install");
    b.type_into("#words", "wb-app=1.0");
    b.click("#go");
    b.wait(Duration::from_secs(90), "the confirmation", |b| {
        b.text("#what").contains("device web-2 will install wb-app=1.0")
    });
    assert!(b.text("#plan").contains("wb-app - → 1.0"), "the dry run: {}", b.text("main"));
    assert_eq!(dev.dpkg_version("wb-app"), None, "the dry run installed it");
    b.screenshot(&screenshots().join("confirm.png"));
    b.click_and_load("#confirm");
    b.element("#ops");
    b.script("window.notReloaded = 7;");
    b.wait(Duration::from_secs(180), "the install to succeed on the page", |b| {
        b.text("#ops")
            .lines()
            .any(|l| l.contains("install") && l.contains("succeeded") && l.contains("ana") && !l.contains("dry run"))
    });
    b.wait(Duration::from_secs(30), "the package table to follow", |b| b.text("#packages").contains("wb-app 1.0"));
    assert_eq!(dev.dpkg_version("wb-app").as_deref(), Some("1.0"));
    // The device's telemetry plotted and its log lines (the install's own among them), both
    // following the device without a reload.
    b.wait(Duration::from_secs(30), "a CPU figure", |b| b.text("#last-cpu").contains('%'));
    let before = b.attribute("#plot-cpu", "points");
    assert!(!before.is_empty());
    b.wait(Duration::from_secs(30), "the plot to follow new samples", |b| b.attribute("#plot-cpu", "points") != before);
    b.wait(Duration::from_secs(30), "the install's log line", |b| b.text("#logs").contains("running install"));
    assert_eq!(b.script("return window.notReloaded;"), 7, "the page was reloaded");
    b.screenshot(&screenshots().join("device.png"));

    // The cfg editor: two wrong fields are each named beside themselves and nothing is sent;
    // a good value reaches the device, which publishes its new configuration.
    b.click_and_load("#edit-cfg");
    b.replace_text(r#"input[name="f:logs.level"]"#, "loud");
    b.replace_text(r#"input[name="f:telemetry.memory.interval_s"]"#, "0");
    b.click_and_load("#send-cfg");
    b.wait(Duration::from_secs(10), "the errors beside the fields", |b| {
        b.text(r#"[id="err-logs.level"]"#).contains("is not one of")
            && b.text(r#"[id="err-telemetry.memory.interval_s"]"#).contains("outside 1..=86400")
    });
    b.screenshot(&screenshots().join("cfg-errors.png"));
    b.replace_text(r#"input[name="f:logs.level"]"#, "debug");
    b.replace_text(r#"input[name="f:telemetry.memory.interval_s"]"#, "30");
    b.replace_text(r#"input[name="f:groups"]"#, r#"["lab", "edge"]"#);
    b.click_and_load("#send-cfg");
    obs.wait("debfleet/device/web-2/cfg", Duration::from_secs(30), |v| {
        v["logs"]["level"] == "debug" && v["telemetry"]["memory"]["interval_s"] == 30 && v["groups"][1] == "edge"
    });
    // Group membership as the console reads it (for the rollout below) comes with `meta`.
    obs.wait("debfleet/device/web-2/meta", Duration::from_secs(30), |v| v["groups"][1] == "edge");
    b.wait(Duration::from_secs(30), "the page to show the new configuration", |b| {
        b.go(&format!("{base}/device/web-2"));
        b.text("#cfg").contains("\"debug\"")
    });

    // A rollout on the web: its waves follow the controller live, and the operator rolls the
    // whole rollout back from the page, after a confirmation that says what will happen.
    let _controller = Web {
        child: Command::new(bin("debfleet"))
            .args(["rollout", "run"])
            .env("DEBFLEET_BROKER", m.url())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    };
    let out = console(
        &m.url(),
        &["rollout", "create", "--group", "edge", "--id", "web-r1", "wb-app=2.0", "--waves", "100%", "--watch", "0s"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    b.go(&format!("{base}/rollouts"));
    b.click_and_load("#rollout-web-r1 a");
    b.element("#waves");
    b.script("window.notReloaded = 9;");
    b.wait(Duration::from_secs(120), "the rollout to succeed on the page", |b| b.text("#phase") == "succeeded");
    assert!(b.text("#waves").contains("1 100% 1 0 0 1"), "{}", b.text("#waves"));
    assert!(b.text("#rollout-devices").contains("web-2 1 healthy wb-app=1.0"), "{}", b.text("#rollout-devices"));
    assert_eq!(b.script("return window.notReloaded;"), 9, "the page was reloaded");
    assert_eq!(dev.dpkg_version("wb-app").as_deref(), Some("2.0"));
    b.click_and_load("#control-rollback");
    b.wait(Duration::from_secs(10), "the confirmation", |b| {
        b.text("#what").contains("goes back to the version it had before")
    });
    b.click_and_load("#confirm");
    b.wait(Duration::from_secs(120), "the rollback on the page", |b| b.text("#phase") == "rolled_back");
    assert_eq!(dev.dpkg_version("wb-app").as_deref(), Some("1.0"));
    b.screenshot(&screenshots().join("rollout.png"));

    // The repository: a .deb uploaded from the page lands in a new suite (checked as `debfleet
    // publish` checks it), then is promoted from there to stable after a confirmation.
    let deb = service_deb(work.path(), "wb-app", "3.0", false);
    b.go(&format!("{base}/repo"));
    b.type_into("#upload-file", deb.to_str().unwrap());
    b.replace_text("#upload-suite", "testing");
    b.click("#upload");
    b.wait(Duration::from_secs(30), "the upload's answer", |b| b.text("#upload-result").contains("wb-app=3.0"));
    b.wait(Duration::from_secs(10), "the new suite on the page", |b| b.exists("#suite-testing"));
    assert!(b.text("#suite-testing").contains("wb-app 3.0"), "{}", b.text("#suites"));
    assert!(!b.text("#suite-stable").contains("3.0"));
    b.screenshot(&screenshots().join("repository.png"));
    b.click_and_load("#suite-testing button.promote");
    assert!(b.text("#what").contains("wb-app=3.0 is published in suite stable"), "{}", b.text("main"));
    b.click_and_load("#confirm");
    b.wait(Duration::from_secs(10), "3.0 in stable", |b| b.text("#suite-stable").contains("wb-app 3.0"));
    let out = Command::new(bin("debfleet"))
        .args(["packages", "--suite", "stable", "--json", "--repo", &repo_url])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(r#""version": "3.0""#),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A forged form (no CSRF token) is refused, and nothing is sent.
    assert_eq!(post_from_page(&b, "/device/web-2/act", "{verb: 'uninstall', words: 'wb-app', confirm: 'yes'}"), 403);
    // A viewer sees no action form, and a hand-made POST with its own token is refused too.
    b.clear_cookies();
    sign_in(&b, &base, "vic", "viewer-pw");
    b.go(&format!("{base}/device/web-2"));
    b.element("#packages");
    assert!(!b.exists("#act"), "a viewer was shown the action form");
    let fields =
        "{csrf: document.querySelector('input[name=csrf]').value, verb: 'uninstall', words: 'wb-app', confirm: 'yes'}";
    assert_eq!(post_from_page(&b, "/device/web-2/act", fields), 403);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(dev.dpkg_version("wb-app").as_deref(), Some("1.0"), "a refused action ran");

    // The audit trail: who did what, refusals included; the chain verifies, a tampered copy not.
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains(r#""user":"ana","role":"operator","action":"install","target":"device/web-2""#), "{log}");
    assert!(log.contains("refused: viewers cannot act") && log.contains("refused: no valid CSRF token"), "{log}");
    let out = console(&m.url(), &["audit", "verify", audit.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let tampered = work.path().join("tampered.log");
    std::fs::write(
        &tampered,
        log.replacen(
            r#""user":"ana","role":"operator","action":"install""#,
            r#""user":"vic","role":"operator","action":"install""#,
            1,
        ),
    )
    .unwrap();
    std::fs::copy(format!("{}.head", audit.display()), format!("{}.head", tampered.display())).unwrap();
    let out = console(&m.url(), &["audit", "verify", tampered.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("TAMPERED"));

    // Beyond loopback only with TLS; over TLS the session cookie is Secure too.
    let out = console(&m.url(), &["web", "--listen", "0.0.0.0:1", "--users", users.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
    let (cert, key) = (work.path().join("cert.pem"), work.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let tls_port = free_port();
    let tls_args = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let _tls = start_web(&m, &users, &audit, &format!("127.0.0.1:{tls_port}"), &tls_args);
    wait_for(Duration::from_secs(20), "the HTTPS console", || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).ok()
    });
    let b = Browser::start_with(&["--ignore-certificate-errors"]);
    sign_in(&b, &format!("https://127.0.0.1:{tls_port}"), "ana", "operator-pw");
    let cookies = b.cookies();
    let session = cookies.iter().find(|c| c["name"] == "debfleet_session").expect("the session cookie");
    assert_eq!(
        (&session["secure"], &session["httpOnly"], &session["sameSite"]),
        (&true.into(), &true.into(), &"Strict".into()),
        "{session}"
    );
    assert!(b.text("#dev-web-2").contains("online"));
}

/// The device page's terminal tab (issue 18): xterm.js on the page, a shell on a real agent;
/// typed commands run, the exit shows, the session is in the audit log; a viewer gets no
/// terminal.
#[test]
fn a_terminal_tab_on_the_device_page() {
    if !browser::available() {
        panic!("headless Chromium is needed (apt-get install chromium chromium-driver)");
    }
    let m = Mosquitto::start();
    let _agent = Agent::start(AgentSpec {
        id: "wt-1",
        port: m.port,
        groups: &[],
        extra: "[remote]\nshell = true\nuser = \"root\"\n",
    });
    let obs = Observer::connect(m.port, &["debfleet/device/wt-1/status"]);
    obs.wait("debfleet/device/wt-1/status", Duration::from_secs(20), |v| v["state"] == "online");
    let dir = tempfile::tempdir().unwrap();
    let (users, audit) = (dir.path().join("users"), dir.path().join("audit.log"));
    add_user(&users, "olga", "operator", "olga-password-1");
    add_user(&users, "vic", "viewer", "vic-password-12");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _web = start_web(&m, &users, &audit, &listen, &[]);
    let base = format!("http://{listen}");
    wait_for(Duration::from_secs(20), "the web console", || std::net::TcpStream::connect(&listen).ok());
    let b = Browser::start();
    sign_in(&b, &base, "olga", "olga-password-1");
    b.go(&format!("{base}/device/wt-1"));
    b.click_and_load("#terminal-link");
    b.wait(Duration::from_secs(20), "the terminal to open", |b| b.text("#term-state") == "open");
    b.type_into(".xterm-helper-textarea", "echo web-$((6*7)); tty\n");
    b.wait(Duration::from_secs(20), "the command's output", |b| b.text(".xterm-rows").contains("web-42"));
    assert!(b.text(".xterm-rows").contains("/dev/pts/"), "{}", b.text(".xterm-rows"));
    std::fs::create_dir_all(screenshots()).unwrap();
    b.screenshot(&screenshots().join("terminal.png"));
    b.type_into(".xterm-helper-textarea", "exit 3\n");
    b.wait(Duration::from_secs(20), "the end", |b| b.text("#term-state") == "ended");
    assert!(b.text(".xterm-rows").contains("exited with status 3"), "{}", b.text(".xterm-rows"));
    let log = wait_for(Duration::from_secs(10), "the session in the audit log", || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.contains("shell session end").then_some(text)
    });
    assert!(log.contains("\"user\":\"olga\"") && log.contains("shell session start"), "{log}");
    // A viewer sees no terminal link, and the page refuses.
    b.clear_cookies();
    sign_in(&b, &base, "vic", "vic-password-12");
    b.go(&format!("{base}/device/wt-1"));
    assert!(!b.exists("#terminal-link"));
    b.go(&format!("{base}/device/wt-1/terminal"));
    assert!(b.text("main").contains("viewers see, operators act"), "{}", b.text("main"));
}
