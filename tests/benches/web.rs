//! The web console's fleet page with many devices (DEVICES, default 10,000): a simulated
//! retained set (each device's meta, status and units, retained on a real Mosquitto), the
//! release `debfleet web` following it, and headless Chromium loading the page. Prints the
//! server's time to answer the page, the browser's time to a rendered page (goal: under 1 s),
//! the time from a status change on the broker to the changed row on the open page (and that the
//! table was not rendered again), and the server's memory per device against the same server
//! on an empty broker in the same run. Run by bench/web.sh.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use debfleet_tests::browser::Browser;
use debfleet_tests::*;
use rumqttc::{Client, MqttOptions, QoS};
use serde_json::json;

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn web(console: &str, m: &Mosquitto, users: &std::path::Path, dir: &std::path::Path) -> Server {
    let port = free_port();
    let child = Command::new(console)
        .args(["web", "--listen", &format!("127.0.0.1:{port}"), "--users"])
        .arg(users)
        .arg("--audit")
        .arg(dir.join(format!("audit-{port}.log")))
        .env("DEBFLEET_BROKER", m.url())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(20), "the web console", || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    Server(child, port)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// One HTTP/1.1 request on a fresh connection: status line, headers, body.
fn http(port: u16, req: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_owned(), body.to_owned())
}

fn session_cookie(port: u16) -> String {
    let body = "user=bench&password=bench-password";
    let req = format!(
        "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (head, _) = http(port, &req);
    let set = head.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect("signed in");
    set.split_once(':').unwrap().1.trim().split(';').next().unwrap().to_owned()
}

fn main() {
    let n: usize = std::env::var("DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let console = std::env::var("DEBFLEET_BIN").unwrap_or_else(|_| bin("debfleet").display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    debfleet_tests::repo::add_web_user(std::path::Path::new(&console), &users, "bench", "operator", "bench-password");

    // The anchor: the same server on an empty broker.
    let empty = Mosquitto::start();
    let idle = web(&console, &empty, &users, dir.path());
    std::thread::sleep(Duration::from_secs(2));
    let idle_kib = rss_kib(idle.0.id());

    // The retained set of N devices.
    let m = Mosquitto::start();
    let mut opts = MqttOptions::new("bench-fleet", "127.0.0.1", m.port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 4096);
    // The connection stays up for the live update below; it tells when the broker has all.
    let (all_in, retained) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut acks = 0;
        for ev in conn.iter() {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = ev {
                acks += 1;
                if acks == n * 3 {
                    let _ = all_in.send(());
                }
            }
        }
    });
    let ts = debfleet_protocol::time::now();
    for i in 0..n {
        let id = format!("sim-{i:05}");
        let group = format!("site-{}", i % 20);
        let meta = json!({
            "v": 1, "device_id": id, "agent_version": "0.1.0", "hostname": id,
            "os": {"id": "debian", "version_id": "12", "pretty_name": "Debian GNU/Linux 12 (bookworm)"},
            "arch": "arm64", "kernel": "6.1.0", "boot_id": "b", "groups": [group, "all"]
        });
        let status = json!({"v": 1, "state": "online", "since": ts, "boot_id": "b"});
        let units = json!({"v": 1, "ts": ts, "units": {
            "kiosk.service": {"package": "kiosk", "active": "active", "sub": "running"}
        }});
        for (t, v) in [("meta", meta), ("status", status), ("state/units", units)] {
            client.publish(format!("debfleet/device/{id}/{t}"), QoS::AtLeastOnce, true, v.to_string()).unwrap();
        }
    }
    retained.recv().unwrap();
    eprintln!("{n} devices retained on the broker");

    // The CLI reads the same retained set.
    let t = Instant::now();
    let out = Command::new(&console).args(["devices", "--json"]).env("DEBFLEET_BROKER", m.url()).output().unwrap();
    let cli_s = t.elapsed().as_secs_f64();
    let listed = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().map(|a| a.len()))
        .unwrap_or(0);

    let started = Instant::now();
    let server = web(&console, &m, &users, dir.path());
    let cookie = session_cookie(server.1);
    // Until the server has read them all (the fleet page lists every device).
    let page_req = format!("GET /?status=online HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
    wait_for(Duration::from_secs(120), "the server to know every device", || {
        let (_, body) = http(server.1, &page_req);
        body.contains(&format!("id=\"counts\">{n} devices")).then_some(())
    });
    let loaded_s = started.elapsed().as_secs_f64();
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n");
    let mut answers = Vec::new();
    let mut size = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let (_, body) = http(server.1, &req);
        answers.push(t.elapsed().as_secs_f64() * 1000.0);
        size = body.len();
    }
    answers.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let full_kib = rss_kib(server.0.id());

    // The browser: sign in, then load the fleet page and read its own timings.
    let b = Browser::start();
    let base = format!("http://127.0.0.1:{}", server.1);
    b.go(&format!("{base}/login"));
    b.type_into("#user", "bench");
    b.type_into("#password", "bench-password");
    b.click("#sign-in");
    b.element("#fleet");
    let mut renders = Vec::new();
    for _ in 0..3 {
        b.go(&base);
        // The page's last row: the fleet page lists a page of devices (the first, as users get it).
        b.element("#fleet tbody tr:last-child");
        // Read once the page has loaded and painted (before that, its entries are not there yet).
        b.wait(Duration::from_secs(30), "the page to load and paint", |b| {
            b.script(
                "const nav = performance.getEntriesByType('navigation')[0];
                 return nav.loadEventEnd > 0 && performance.getEntriesByType('paint').some(p => p.name === 'first-contentful-paint');",
            ) == true
        });
        let t = b.script(
            "const nav = performance.getEntriesByType('navigation')[0];
             const paint = performance.getEntriesByType('paint').find(p => p.name === 'first-contentful-paint');
             return [nav.responseEnd - nav.startTime, nav.domContentLoadedEventEnd - nav.startTime, nav.loadEventEnd - nav.startTime, paint ? paint.startTime : -1];",
        );
        renders.push((t[0].as_f64().unwrap(), t[1].as_f64().unwrap(), t[2].as_f64().unwrap(), t[3].as_f64().unwrap()));
    }
    renders.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
    let (response, dom, load, paint) = renders[1];

    // A device goes lost on the broker: its row changes in place, the table is the same node.
    let rows = b.script("return document.getElementById('fleet').tBodies[0].rows.length;").as_u64().unwrap();
    let victim = format!("sim-{:05}", rows / 2);
    b.script("document.getElementById('fleet').tBodies[0].dataset.mark = 'kept'; window.notReloaded = 1;");
    let lost = json!({"v": 1, "state": "lost", "since": ts, "boot_id": "b"});
    let t = Instant::now();
    client.publish(format!("debfleet/device/{victim}/status"), QoS::AtLeastOnce, true, lost.to_string()).unwrap();
    b.wait(Duration::from_secs(30), "the row to turn lost", |b| {
        b.script(&format!("return document.getElementById('dev-{victim}').className;")) == "status-lost"
    });
    let update_ms = t.elapsed().as_secs_f64() * 1000.0;
    let kept = b.script(
        "return document.getElementById('fleet').tBodies[0].dataset.mark === 'kept' && window.notReloaded === 1;",
    );

    println!("web console, fleet page with {n} devices (simulated retained set on Mosquitto, release debfleet web)");
    println!("  CLI: debfleet devices listed {listed} of {n} in {cli_s:.1} s");
    println!("  server: read the retained set and knew every device (the fleet's count on the page) in {loaded_s:.1} s from its start");
    println!(
        "  server: GET / (the first page, {rows} rows, {:.2} MB of HTML) in {:.0} ms median ({:.0}..{:.0} ms over 5)",
        size as f64 / 1e6,
        answers[2],
        answers[0],
        answers[4]
    );
    println!(
        "  Chromium: response end {response:.0} ms, first contentful paint {paint:.0} ms, DOM ready {dom:.0} ms, load {load:.0} ms (median of 3; goal: first render under 1000 ms: DOM ready {:.2}x, load {:.2}x)",
        dom / 1000.0,
        load / 1000.0
    );
    println!(
        "  live update: a status change on the broker to the changed row on the open page in {update_ms:.0} ms; table not rendered again: {kept}"
    );
    println!(
        "  server memory: {full_kib} KiB resident with {n} devices, {idle_kib} KiB on an empty broker: {:.2} KiB per device",
        (full_kib.saturating_sub(idle_kib)) as f64 / n as f64
    );
}
