//! The pages, checks and audit against a fake fleet (the end-to-end test with a real browser,
//! broker and agents is `tests/tests/web.rs`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{header, Request, StatusCode};
use tower::ServiceExt;

use super::*;

/// Two devices; it remembers what it was asked.
struct Fake {
    asked: Mutex<Vec<Act>>,
    steered: Mutex<Vec<(String, Action, String)>>,
    /// Uploads (the file's bytes, the suite, where it was) and promotions asked of the repository.
    uploads: Mutex<Vec<(Vec<u8>, String, std::path::PathBuf)>>,
    promoted: Mutex<Vec<String>>,
    /// More devices, `sim-00000`...: for paging.
    extra: usize,
    tx: broadcast::Sender<Update>,
}

/// A rollout halted in its first wave: lab-1 failed, lab-2 not reached.
fn halted() -> RolloutView {
    let spec = serde_json::json!({
        "v": 1, "id": "r1", "group": "lab", "packages": {"hello": "2.0"}, "waves": ["1", "100%"],
        "success_pct": 95, "max_failures": 1, "watch_s": 10, "deadline_s": 600, "auto_rollback": false,
        "pause_after_wave": false, "by": "ana", "ts": "2026-12-04T10:00:00.000Z"
    });
    let state = serde_json::json!({
        "v": 1, "id": "r1", "phase": "halted", "wave": 0, "members": ["lab-1", "lab-2"],
        "devices": {"lab-1": {"wave": 0, "state": "failed", "error": {"code": "unit_failed", "message": "hello.service failed"},
                    "before": {"hello": "1.0"}, "revision": 2, "since_ms": 0}},
        "reason": "1 failure reached --max-failures 1", "control_seq": 0, "ts": "2026-12-04T10:01:00.000Z"
    });
    RolloutView { spec: serde_json::from_value(spec).unwrap(), state: Some(serde_json::from_value(state).unwrap()) }
}

fn row(id: &str, status: &str) -> DeviceRow {
    DeviceRow {
        id: id.into(),
        status: status.into(),
        since: "2026-12-04T10:00:00.000Z".into(),
        agent_version: "0.1.0".into(),
        groups: vec!["lab".into()],
        units: 1,
        units_failed: 0,
    }
}

impl Backend for Fake {
    fn devices(&self) -> Vec<DeviceRow> {
        let mut all = vec![row("lab-1", "online"), row("lab-2", "lost")];
        all.extend((0..self.extra).map(|i| row(&format!("sim-{i:05}"), "online")));
        all
    }
    fn device(&self, id: &DeviceId) -> Option<DeviceDetail> {
        (id.as_str() == "lab-1").then(|| DeviceDetail {
            row: row("lab-1", "online"),
            hostname: "lab-1".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            arch: "amd64".into(),
            packages: vec![PackageRow { name: "hello".into(), version: "2.0".into(), status: "installed".into() }],
            units: vec![],
            ops: vec![],
            cfg: Some(debfleet_protocol::RuntimeCfg::default()),
            telemetry: {
                let now = debfleet_protocol::time::now_unix_ms() / 1000;
                vec![
                    history::Point { t: now - 600, cpu: Some(12.0), memory: Some(40.0), disk: None },
                    history::Point { t: now - 60, cpu: Some(30.0), memory: Some(41.0), disk: None },
                ]
            },
            logs: vec![history::LogRow::new("2026-12-04T10:00:00.000Z", "warn", "hello", "<b>disk</b> filling")],
        })
    }
    fn updates(&self) -> broadcast::Receiver<Update> {
        self.tx.subscribe()
    }
    fn rollouts(&self) -> Vec<RolloutView> {
        vec![halted()]
    }
    fn repository(&self) -> BoxFuture<Result<Vec<repo::RepoSuite>, String>> {
        let v = serde_json::json!([
            {"suite": "stable", "packages": [{"name": "hello", "versions": [{"version": "2.0", "arch": "all", "size": 1234}]}]},
            {"suite": "testing", "packages": []}
        ]);
        Box::pin(async move { Ok(serde_json::from_value(v).unwrap()) })
    }
    fn upload(&self, file: std::path::PathBuf, suite: String) -> BoxFuture<Result<String, String>> {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "readable by others");
        self.uploads.lock().unwrap().push((std::fs::read(&file).unwrap(), suite, file));
        Box::pin(async { Ok("hello=3.0 (all) published in stable".to_owned()) })
    }
    fn promote(&self, name: String, version: String, from: String, to: String) -> BoxFuture<Result<String, String>> {
        self.promoted.lock().unwrap().push(format!("{name}={version} {from}->{to}"));
        Box::pin(async { Ok("promoted".to_owned()) })
    }
    fn terminal(
        &self,
        _device: DeviceId,
        _by: String,
        _cols: u16,
        _rows: u16,
    ) -> BoxFuture<Result<crate::terminal::Terminal, String>> {
        Box::pin(async { Err("no terminals in this fake".to_owned()) })
    }
    fn journal(
        &self,
        _device: DeviceId,
        _unit: Option<String>,
        _lines: u32,
        _by: String,
    ) -> BoxFuture<Result<serde_json::Value, String>> {
        Box::pin(async {
            Ok(
                serde_json::json!({"entries": [{"ts": "2026-12-05T00:00:00.000Z", "unit": "demo.service", "priority": 6, "message": "hello from the journal"}]}),
            )
        })
    }
    fn steer(&self, id: RolloutId, action: Action, by: String) -> BoxFuture<Result<String, String>> {
        self.steered.lock().unwrap().push((id.to_string(), action, by));
        Box::pin(async { Ok("applied".to_owned()) })
    }
    fn act(&self, act: Act) -> BoxFuture<Result<Vec<String>, String>> {
        let dry = matches!(&act.args, CommandArgs::Install { options, .. } if options.dry_run);
        self.asked.lock().unwrap().push(act);
        Box::pin(async move { Ok(if dry { vec!["lab-1: hello 1.0 → 2.0".into()] } else { vec![] }) })
    }
}

struct Site {
    app: Arc<App>,
    fake: Arc<Fake>,
    router: Router,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    site_with(0)
}

fn site_with(extra: usize) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let mut u = users::Users::load(&users).unwrap();
    u.add("ana", Role::Operator, "operator pw").unwrap();
    u.add("vic", Role::Viewer, "viewer pw 1").unwrap();
    let audit = dir.path().join("audit.log");
    let fake = Arc::new(Fake {
        asked: Mutex::default(),
        steered: Mutex::default(),
        uploads: Mutex::default(),
        promoted: Mutex::default(),
        extra,
        tx: broadcast::channel(16).0,
    });
    let app = App::new(fake.clone(), &Config { users, audit: audit.clone(), secure: false }).unwrap();
    let router = app.router().layer(MockConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    Site { app, fake, router, audit, _dir: dir }
}

async fn send(router: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let res = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
}

fn form(uri: &str, cookie: Option<&str>, body: &str) -> Request<Body> {
    let mut r = Request::post(uri).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, format!("{COOKIE}={c}"));
    }
    r.body(Body::from(body.to_owned())).unwrap()
}

fn get(uri: &str, cookie: Option<&str>) -> Request<Body> {
    let mut r = Request::get(uri);
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, format!("{COOKIE}={c}"));
    }
    r.body(Body::empty()).unwrap()
}

/// Signs in; the session cookie and its CSRF token.
async fn sign_in(s: &Site, user: &str, password: &str) -> (String, String) {
    let (status, headers, _) = send(&s.router, form("/login", None, &format!("user={user}&password={password}"))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set = headers.get(header::SET_COOKIE).unwrap().to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let id = set.split(';').next().unwrap().split_once('=').unwrap().1.to_owned();
    let csrf = s.app.sessions.get(&id).unwrap().csrf;
    (id, csrf)
}

#[tokio::test]
async fn sign_in_is_required_checked_and_limited() {
    let s = site();
    let (status, headers, _) = send(&s.router, get("/", None)).await;
    assert_eq!((status, headers.get(header::LOCATION).unwrap().to_str().unwrap()), (StatusCode::SEE_OTHER, "/login"));
    assert_eq!(send(&s.router, get("/events", None)).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(send(&s.router, get("/", Some("forged"))).await.0, StatusCode::SEE_OTHER);
    let (_, _, page) = send(&s.router, get("/login", None)).await;
    assert!(page.contains("name=\"password\""));
    for _ in 0..session::MAX_FAILURES {
        let (status, _, page) = send(&s.router, form("/login", None, "user=ana&password=wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(page.contains("wrong user name or password"));
    }
    // Held back, even with the right password, until the window passes.
    let (status, _, page) = send(&s.router, form("/login", None, "user=ana&password=operator+pw")).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{page}");
    s.app.limiter.succeeded("127.0.0.1".parse().unwrap());
    let (cookie, _) = sign_in(&s, "ana", "operator+pw").await;
    let (status, _, page) = send(&s.router, get("/", Some(&cookie))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("id=\"dev-lab-1\"") && page.contains("class=\"status-lost\""), "{page}");
    let (_, _, filtered) = send(&s.router, get("/?status=lost", Some(&cookie))).await;
    assert!(!filtered.contains("dev-lab-1") && filtered.contains("dev-lab-2"));
}

#[tokio::test]
async fn actions_need_the_csrf_token_and_an_operator_and_are_audited() {
    let s = site();
    let (viewer, viewer_csrf) = sign_in(&s, "vic", "viewer+pw+1").await;
    let (op, csrf) = sign_in(&s, "ana", "operator+pw").await;
    // A viewer's POST is refused on the server, whatever the page showed.
    let (status, _, _) =
        send(&s.router, form("/device/lab-1/act", Some(&viewer), &format!("csrf={viewer_csrf}&verb=ping&confirm=yes")))
            .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, _, page) = send(&s.router, get("/device/lab-1", Some(&viewer))).await;
    assert!(!page.contains("id=\"act\""), "a viewer sees no action form");
    // A forged form (no token, or another session's) is refused.
    for body in ["verb=ping&confirm=yes".to_owned(), format!("csrf={viewer_csrf}&verb=ping&confirm=yes")] {
        let (status, _, _) = send(&s.router, form("/device/lab-1/act", Some(&op), &body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    assert!(s.fake.asked.lock().unwrap().is_empty(), "nothing was sent");
    // Without confirm: what will happen, with the devices' dry run; nothing changes.
    let (status, _, page) =
        send(&s.router, form("/device/lab-1/act", Some(&op), &format!("csrf={csrf}&verb=install&words=hello%3D2.0")))
            .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("device lab-1 will install hello=2.0") && page.contains("hello 1.0 → 2.0"), "{page}");
    // Confirmed: sent, by the signed-in user.
    let body = format!("csrf={csrf}&verb=install&words=hello%3D2.0&confirm=yes");
    let (status, headers, _) = send(&s.router, form("/device/lab-1/act", Some(&op), &body)).await;
    assert_eq!(
        (status, headers.get(header::LOCATION).unwrap().to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/device/lab-1")
    );
    let asked = s.fake.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2);
    assert!(matches!(&asked[0].args, CommandArgs::Install { options, .. } if options.dry_run));
    assert!(matches!(&asked[1].args, CommandArgs::Install { options, .. } if !options.dry_run));
    assert_eq!((asked[1].by.as_str(), &asked[1].target), ("ana", &Target::Device(DeviceId::new("lab-1").unwrap())));
    // Bad words are refused before anything is sent.
    let (status, _, _) = send(
        &s.router,
        form("/group/lab/act", Some(&op), &format!("csrf={csrf}&verb=install&words=bad%3B+rm&confirm=yes")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // The audit trail: sign-ins, the refusals, the action; the chain verifies.
    let text = std::fs::read_to_string(&s.audit).unwrap();
    assert!(text.contains("refused: viewers cannot act") && text.contains("refused: no valid CSRF token"), "{text}");
    assert!(text.contains(r#""user":"ana","role":"operator","action":"install","target":"device/lab-1""#), "{text}");
    assert_eq!(audit::verify(&s.audit).unwrap().0, text.lines().count());
}

#[tokio::test]
async fn open_pages_get_updates_as_server_sent_events() {
    let s = site();
    let (cookie, _) = sign_in(&s, "ana", "operator+pw").await;
    let res = s.router.clone().oneshot(get("/events", Some(&cookie))).await.unwrap();
    assert_eq!(res.headers().get(header::CONTENT_TYPE).unwrap(), "text/event-stream");
    s.fake.tx.send(Update::Device(row("lab-1", "lost"))).unwrap();
    let mut body = res.into_body().into_data_stream();
    let chunk = futures_util::StreamExt::next(&mut body).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.contains("event: device") && text.contains(r#""status":"lost""#), "{text}");

    // A device's page also gets its telemetry and logs; the fleet page and other devices' pages
    // do not.
    let page = s.router.clone().oneshot(get("/events?device=lab-1", Some(&cookie))).await.unwrap();
    let mut page = page.into_body().into_data_stream();
    let point = history::Point { t: 1, cpu: Some(5.0), memory: None, disk: None };
    s.fake.tx.send(Update::Telemetry { device: "lab-2".into(), point }).unwrap();
    s.fake.tx.send(Update::Telemetry { device: "lab-1".into(), point }).unwrap();
    s.fake.tx.send(Update::Device(row("lab-1", "online"))).unwrap();
    let chunk = futures_util::StreamExt::next(&mut page).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.contains("event: telemetry") && text.contains(r#""device":"lab-1""#), "{text}");
    let chunk = futures_util::StreamExt::next(&mut body).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(text.contains("event: device") && text.contains(r#""status":"online""#), "{text}");
}

#[tokio::test]
async fn the_device_page_plots_telemetry_and_lists_log_lines_escaped() {
    let s = site();
    let (cookie, _) = sign_in(&s, "vic", "viewer+pw+1").await;
    let (status, _, page) = send(&s.router, get("/device/lab-1", Some(&cookie))).await;
    assert_eq!(status, StatusCode::OK);
    // Two points on the CPU and memory plots (x seconds into the six hours, y = 100 - value),
    // none on the disk's.
    let cpu = page.split(r#"id="plot-cpu""#).nth(1).unwrap().split("/>").next().unwrap();
    assert!(cpu.contains(",88.0 ") && cpu.contains(",70.0\""), "{cpu}");
    assert!(page.contains(r#"id="last-cpu">30 %"#) && page.contains(r#"id="last-disk">no samples yet"#), "{page}");
    assert!(page.contains("&lt;b&gt;disk") && page.contains(" filling") && !page.contains("<b>disk"), "{page}");
}

#[tokio::test]
async fn the_cfg_editor_names_every_wrong_field_and_sends_only_what_changed() {
    let s = site();
    let (viewer, viewer_csrf) = sign_in(&s, "vic", "viewer+pw+1").await;
    let (op, csrf) = sign_in(&s, "ana", "operator+pw").await;
    let (status, _, page) = send(&s.router, get("/device/lab-1/cfg", Some(&op))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"name="f:logs.level" value="info""#), "{page}");
    assert!(page.contains(r#"name="f:telemetry.cpu.interval_s" value="10""#), "{page}");
    // Two wrong fields: each named beside itself, nothing sent.
    let body = format!("csrf={csrf}&f%3Alogs.level=loud&f%3Atelemetry.cpu.interval_s=0&f%3Alogs.batch_s=5");
    let (status, _, page) = send(&s.router, form("/device/lab-1/cfg", Some(&op), &body)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let error_of = |key: &str| {
        let cell = page.split(&format!(r#"id="err-{key}">"#)).nth(1).unwrap();
        cell[..cell.find("</td>").unwrap()].to_owned()
    };
    assert!(error_of("logs.level").contains("is not one of error, warn, info"), "{page}");
    assert!(error_of("telemetry.cpu.interval_s").contains("outside 1..=86400"), "{page}");
    assert_eq!(error_of("logs.batch_s"), "");
    assert!(page.contains(r#"name="f:logs.level" value="loud""#), "what was typed stays: {page}");
    assert!(s.fake.asked.lock().unwrap().is_empty());
    // A viewer's POST and a forged one are refused.
    let body = format!("csrf={viewer_csrf}&f%3Alogs.level=debug");
    assert_eq!(send(&s.router, form("/device/lab-1/cfg", Some(&viewer), &body)).await.0, StatusCode::FORBIDDEN);
    let body = "f%3Alogs.level=debug";
    assert_eq!(send(&s.router, form("/device/lab-1/cfg", Some(&op), body)).await.0, StatusCode::FORBIDDEN);
    assert!(s.fake.asked.lock().unwrap().is_empty());
    // A good change: only the changed key goes, by the signed-in user, audited. A field left as
    // the form showed it is not sent, even when the device has another value by now (someone
    // else's change stays), nor one written with other spacing.
    let body = format!(
        "csrf={csrf}&f%3Alogs.level=debug&o%3Alogs.level=info&f%3Alogs.batch_s=3&o%3Alogs.batch_s=3&f%3Aprofile=default\
         &f%3Atelemetry.disk.mounts=%5B%22%2F%22%5D&o%3Atelemetry.disk.mounts=%5B+%22%2F%22+%5D"
    );
    let (status, headers, _) = send(&s.router, form("/device/lab-1/cfg", Some(&op), &body)).await;
    assert_eq!(
        (status, headers.get(header::LOCATION).unwrap().to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/device/lab-1")
    );
    let asked = s.fake.asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].args, CommandArgs::Cfg { set: serde_json::json!({"logs": {"level": "debug"}}) });
    assert_eq!(asked[0].by, "ana");
    let text = std::fs::read_to_string(&s.audit).unwrap();
    assert!(text.contains(r#""action":"cfg","target":"device/lab-1","detail":"logs.level=\"debug\"""#), "{text}");
}

#[tokio::test]
async fn rollouts_show_their_waves_and_are_steered_after_a_confirmation() {
    let s = site();
    let (viewer, viewer_csrf) = sign_in(&s, "vic", "viewer+pw+1").await;
    let (op, csrf) = sign_in(&s, "ana", "operator+pw").await;
    let (_, _, list) = send(&s.router, get("/rollouts", Some(&viewer))).await;
    assert!(list.contains(r#"id="rollout-r1""#) && list.contains("hello=2.0") && list.contains("halted"), "{list}");
    let (_, _, page) = send(&s.router, get("/rollout/r1", Some(&op))).await;
    // Wave 1: one device, failed; the reason; the controls a halted rollout takes.
    let wave1 = page.split("<tbody>").nth(1).unwrap().split("</tr>").next().unwrap();
    assert!(wave1.contains("<td>1</td><td>1</td><td>1</td>") && wave1.contains(r#"<td class="bad">1</td>"#), "{wave1}");
    assert!(page.contains("1 failure reached --max-failures 1") && page.contains("unit_failed: hello.service failed"));
    for c in ["abort", "retry", "rollback"] {
        assert!(page.contains(&format!(r#"id="control-{c}""#)), "{c}: {page}");
    }
    assert!(!page.contains(r#"id="control-pause""#) && !page.contains(r#"id="control-resume""#));
    let (_, _, page) = send(&s.router, get("/rollout/r1", Some(&viewer))).await;
    assert!(!page.contains("control-"), "a viewer sees no controls");
    // A viewer's POST: 403. An operator's: first what will happen, then, confirmed, steered.
    let body = format!("csrf={viewer_csrf}&action=rollback&confirm=yes");
    assert_eq!(send(&s.router, form("/rollout/r1/act", Some(&viewer), &body)).await.0, StatusCode::FORBIDDEN);
    let (status, _, page) =
        send(&s.router, form("/rollout/r1/act", Some(&op), &format!("csrf={csrf}&action=rollback"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("goes back to the version it had before"), "{page}");
    assert!(s.fake.steered.lock().unwrap().is_empty());
    let body = format!("csrf={csrf}&action=rollback&confirm=yes");
    let (status, headers, _) = send(&s.router, form("/rollout/r1/act", Some(&op), &body)).await;
    assert_eq!(
        (status, headers.get(header::LOCATION).unwrap().to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/rollout/r1")
    );
    assert_eq!(s.fake.steered.lock().unwrap().clone(), [("r1".to_owned(), Action::Rollback, "ana".to_owned())]);
    let text = std::fs::read_to_string(&s.audit).unwrap();
    assert!(text.contains(r#""user":"ana","role":"operator","action":"rollback","target":"rollout/r1""#), "{text}");
    assert!(text.contains(r#""user":"vic","role":"viewer","action":"rollback","target":"rollout/r1""#), "{text}");
    let body = format!("csrf={csrf}&action=explode&confirm=yes");
    assert_eq!(send(&s.router, form("/rollout/r1/act", Some(&op), &body)).await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_repository_page_lists_uploads_and_promotes_for_operators_only() {
    let s = site();
    let (viewer, viewer_csrf) = sign_in(&s, "vic", "viewer+pw+1").await;
    let (op, csrf) = sign_in(&s, "ana", "operator+pw").await;
    let (_, _, page) = send(&s.router, get("/repo", Some(&op))).await;
    assert!(page.contains(r#"id="suite-stable""#) && page.contains("<td>hello</td><td>2.0</td>"), "{page}");
    assert!(page.contains(r#"id="upload-form""#) && page.contains("<option>testing</option>"), "{page}");
    let (_, _, page) = send(&s.router, get("/repo", Some(&viewer))).await;
    assert!(!page.contains("upload-form") && !page.contains("Promote"), "a viewer sees no actions");
    let upload = |cookie: &str, token: Option<&str>, suite: &str| {
        let mut r = Request::post(format!("/repo/upload?suite={suite}&name=hello_3.0_all.deb"))
            .header(header::COOKIE, format!("{COOKIE}={cookie}"));
        if let Some(t) = token {
            r = r.header("x-csrf-token", t);
        }
        r.body(Body::from(&b"!<arch>\ndebian-binary"[..])).unwrap()
    };
    // Without the token, or a viewer's: refused, nothing sent.
    assert_eq!(send(&s.router, upload(&op, None, "stable")).await.0, StatusCode::FORBIDDEN);
    assert_eq!(send(&s.router, upload(&viewer, Some(&viewer_csrf), "stable")).await.0, StatusCode::FORBIDDEN);
    assert_eq!(send(&s.router, upload(&op, Some(&csrf), "..%2Fetc")).await.0, StatusCode::BAD_REQUEST);
    assert!(s.fake.uploads.lock().unwrap().is_empty());
    let (status, _, answer) = send(&s.router, upload(&op, Some(&csrf), "stable")).await;
    assert_eq!((status, answer.as_str()), (StatusCode::OK, "hello=3.0 (all) published in stable"));
    let (bytes, suite, spooled) = s.fake.uploads.lock().unwrap()[0].clone();
    assert_eq!((bytes.as_slice(), suite.as_str()), (&b"!<arch>\ndebian-binary"[..], "stable"));
    assert!(!spooled.exists(), "the spooled upload is removed");
    // Promotion: what will happen first, then done.
    let body = format!("csrf={csrf}&name=hello&version=2.0&from=stable&to=testing");
    let (status, _, page) = send(&s.router, form("/repo/promote", Some(&op), &body)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("hello=2.0 is published in suite testing"), "{page}");
    assert!(s.fake.promoted.lock().unwrap().is_empty());
    let (status, _, _) = send(&s.router, form("/repo/promote", Some(&op), &format!("{body}&confirm=yes"))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(s.fake.promoted.lock().unwrap().clone(), ["hello=2.0 stable->testing"]);
    let text = std::fs::read_to_string(&s.audit).unwrap();
    assert!(
        text.contains(
            r#""action":"upload","target":"repo/stable","detail":"hello_3.0_all.deb (21 bytes)","outcome":"sent""#
        ),
        "{text}"
    );
    assert!(text.contains(r#""action":"promote","target":"repo/testing","detail":"hello=2.0 from stable""#), "{text}");
}

#[tokio::test]
async fn a_user_removed_or_given_another_role_is_signed_out() {
    let s = site();
    let (op, _) = sign_in(&s, "ana", "operator+pw").await;
    assert_eq!(send(&s.router, get("/", Some(&op))).await.0, StatusCode::OK);
    let path = s.audit.with_file_name("users");
    // Another modification time than the sign-in's read, whatever the file system's clock grain.
    std::thread::sleep(std::time::Duration::from_millis(20));
    users::Users::load(&path).unwrap().add("ana", Role::Viewer, "operator pw").unwrap();
    let (status, headers, _) = send(&s.router, get("/", Some(&op))).await;
    assert_eq!((status, headers.get(header::LOCATION).unwrap().to_str().unwrap()), (StatusCode::SEE_OTHER, "/login"));
    // Signed in again, with the role the file now gives.
    let (viewer, _) = sign_in(&s, "ana", "operator+pw").await;
    let (_, _, page) = send(&s.router, get("/", Some(&viewer))).await;
    assert!(page.contains("ana (viewer)"), "{page}");
}

#[tokio::test]
async fn a_large_fleet_is_paged_with_its_filters_kept() {
    let s = site_with(2 * FLEET_PAGE + 10);
    let (op, _) = sign_in(&s, "ana", "operator+pw").await;
    let rows = |page: &str| page.matches("<tr id=\"dev-").count();
    let (_, _, first) = send(&s.router, get("/", Some(&op))).await;
    assert_eq!(rows(&first), FLEET_PAGE);
    assert!(first.contains(&format!("{} devices, 1 of 3 pages", 2 * FLEET_PAGE + 12)), "{first}");
    assert!(
        first.contains(r#"id="counts">2012 devices"#) && first.contains(r#"data-whole="false""#),
        "{}",
        &first[..2000]
    );
    let (_, _, last) = send(&s.router, get("/?status=online&page=3", Some(&op))).await;
    assert_eq!(rows(&last), 2 * FLEET_PAGE + 11 - 2 * FLEET_PAGE);
    assert!(last.contains(r#"?status=online&amp;page=2" id="previous""#), "{last}");
    // Past the last page: the last page. A search narrows to one page, the whole of what matches.
    let (_, _, beyond) = send(&s.router, get("/?page=99", Some(&op))).await;
    assert_eq!(rows(&beyond), 12);
    let (_, _, found) = send(&s.router, get("/?q=sim-0100", Some(&op))).await;
    assert_eq!(rows(&found), 10);
    assert!(!found.contains(r#"id="pager""#));
}

#[tokio::test]
async fn the_journal_view_and_the_terminal_are_guarded() {
    let s = site();
    let (viewer, viewer_csrf) = sign_in(&s, "vic", "viewer+pw+1").await;
    let (op, csrf) = sign_in(&s, "ana", "operator+pw").await;
    // Reading the journal changes nothing: a viewer may.
    let (status, _, page) =
        send(&s.router, get("/device/lab-1/journal?unit=demo.service&lines=5", Some(&viewer))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("hello from the journal") && page.contains("value=\"demo.service\""), "{page}");
    assert_eq!(send(&s.router, get("/device/nope/journal", Some(&viewer))).await.0, StatusCode::NOT_FOUND);
    // A terminal is an operator's, with the page's CSRF token; refusals are audited.
    let (_, _, page) = send(&s.router, get("/device/lab-1", Some(&viewer))).await;
    assert!(page.contains("id=\"journal-link\"") && !page.contains("id=\"terminal-link\""));
    assert_eq!(send(&s.router, get("/device/lab-1/terminal", Some(&viewer))).await.0, StatusCode::FORBIDDEN);
    let open = |cookie: &str, csrf: &str| {
        form("/device/lab-1/terminal", Some(cookie), &format!("csrf={csrf}&cols=80&rows=24"))
    };
    assert_eq!(send(&s.router, open(&viewer, &viewer_csrf)).await.0, StatusCode::FORBIDDEN);
    assert_eq!(send(&s.router, open(&op, "forged")).await.0, StatusCode::FORBIDDEN);
    let (_, _, page) = send(&s.router, get("/device/lab-1/terminal", Some(&op))).await;
    assert!(page.contains("/static/vendor/xterm.js"), "{page}");
    // This fake opens no terminals: the operator is told why, and the audit log has both.
    let (status, _, body) = send(&s.router, open(&op, &csrf)).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("no terminals in this fake"), "{body}");
    let log = std::fs::read_to_string(s.app.audit.lock().unwrap().path()).unwrap();
    assert!(log.contains("refused: viewers cannot act") && log.contains("failed: no terminals in this fake"), "{log}");
    // Another session cannot use a terminal it did not open (nor a made-up one).
    let input = Request::post("/terminal/made-up/input")
        .header(header::COOKIE, format!("debfleet_session={op}"))
        .header("x-csrf", csrf.clone())
        .body(Body::from("ls\r"))
        .unwrap();
    assert_eq!(send(&s.router, input).await.0, StatusCode::NOT_FOUND);
}
