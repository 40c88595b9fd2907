//! Bytes on the wire per device, TCP/IP headers included, from a capture (tcpdump) of each
//! agent's own connection: first connect, idle (projected to a month), one ping, one
//! reconnect, and one install of a small package (on lab devices). Three agents side by side in
//! the same run: the baseline (the agent before issue 12, `BASELINE_AGENT_BIN`), this agent with
//! the default profile, and with `profile = "cellular"`. Printed with ratios to the goals: idle
//! cellular ≤ 0.5 MB a month, a reconnect ≤ 2 KB, the defaults no worse than the baseline.
//! Run by bench/wire.sh (which builds both agents); `DURATION` is the idle time in seconds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use debfleet_tests::lab::Device;
use debfleet_tests::repo::RepoServer;
use debfleet_tests::*;

/// One tcpdump on a port of the loopback interface.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(dir: &Path, port: u16) -> Capture {
        let file = dir.join(format!("{port}.pcap"));
        let child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-n", "-s", "128", "-w"])
            .arg(&file)
            .arg(format!("tcp port {port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump is installed (bench/wire.sh installs it)");
        std::thread::sleep(Duration::from_millis(1500));
        Capture { child, file }
    }

    /// Every captured frame so far: (time in µs since the epoch, the IP packet, as far as
    /// captured).
    fn records(&self) -> Vec<(u64, Vec<u8>)> {
        let b = std::fs::read(&self.file).unwrap_or_default();
        let mut out = Vec::new();
        if b.len() < 24 {
            return out;
        }
        let link = u32::from_le_bytes(b[20..24].try_into().unwrap());
        let ip_at = match link {
            1 => 14,   // Ethernet (what Linux gives for lo)
            113 => 16, // Linux cooked
            _ => 0,
        };
        let mut at = 24;
        while at + 16 <= b.len() {
            let sec = u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as u64;
            let usec = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as u64;
            let incl = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
            let data = &b[at + 16..(at + 16 + incl).min(b.len())];
            if data.len() >= ip_at + 20 {
                out.push((sec * 1_000_000 + usec, data[ip_at..].to_vec()));
            }
            at += 16 + incl;
        }
        out
    }

    /// (time, IP length, to `port`?, the TCP payload as captured) of every segment between two
    /// times.
    fn segments(&self, port: u16, from: u64, to: u64) -> Vec<(u64, u64, bool, Vec<u8>)> {
        let mut out = Vec::new();
        for (t, ip) in self.records() {
            if t < from || t >= to {
                continue;
            }
            let len = u64::from(u16::from_be_bytes([ip[2], ip[3]]));
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let Some(tcp) = ip.get(ihl..).filter(|t| t.len() >= 20) else { continue };
            let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            let off = usize::from(tcp[12] >> 4) * 4;
            let mqtt = tcp.get(off..).map(<[u8]>::to_vec).unwrap_or_default();
            out.push((t, len, dport == port, mqtt));
        }
        out
    }

    /// PUBLISH packets the agent sent (to `port`) between two times, and the bytes of their
    /// topic names: what MQTT 5 topic aliases could replace (each segment's first MQTT packet
    /// only, so a lower bound).
    fn publishes_to(&self, port: u16, from: u64, to: u64) -> (usize, u64) {
        let (mut n, mut topic_bytes) = (0, 0);
        for (_, _, up, m) in self.segments(port, from, to) {
            if !up || m.len() < 4 || m[0] & 0xf0 != 0x30 {
                continue;
            }
            let mut i = 1;
            while i < m.len() && m[i] & 0x80 != 0 {
                i += 1;
            }
            if i + 2 < m.len() {
                n += 1;
                topic_bytes += u64::from(u16::from_be_bytes([m[i + 1], m[i + 2]]));
            }
        }
        (n, topic_bytes)
    }

    /// What one `state/link` report costs on the wire, from the last one the agent sent before
    /// `to`: its segment, the broker's PUBACK (QoS 1) and the agent's bare ACK, each with the
    /// TCP/IP header size this capture shows. None when no report went alone in a segment.
    fn link_report(&self, port: u16, to: u64) -> Option<u64> {
        let mut found = None;
        for (_, len, up, m) in self.segments(port, 0, to) {
            if !up || m.len() < 4 || m[0] & 0xf0 != 0x30 {
                continue;
            }
            let (mut remaining, mut i, mut shift) = (0u64, 1, 0);
            while i < m.len() {
                remaining |= u64::from(m[i] & 0x7f) << shift;
                shift += 7;
                i += 1;
                if m[i - 1] & 0x80 == 0 {
                    break;
                }
            }
            let Some(topic_len) = m.get(i..i + 2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
                continue;
            };
            let topic = m.get(i + 2..i + 2 + topic_len).unwrap_or_default();
            let packet = i as u64 + remaining;
            if topic.ends_with(b"/state/link") && len > packet {
                let header = len - packet;
                let qos1 = m[0] & 0x06 != 0;
                found = Some(len + if qos1 { (header + 4) + header } else { header });
            }
        }
        found
    }

    /// Every segment between two times: to the broker?, IP length, the MQTT packet type of
    /// its first byte (for `WIRE_DUMP=1`).
    fn dump(&self, port: u16, from: u64, to: u64) -> Vec<(bool, u64, u8)> {
        self.segments(port, from, to)
            .into_iter()
            .map(|(_, len, up, m)| (up, len, m.first().map_or(0, |b| b >> 4)))
            .collect()
    }

    /// Bytes (and packets) between two times (µs since the epoch).
    fn between(&self, from: u64, to: u64) -> (u64, usize) {
        let p: Vec<u64> = self
            .records()
            .into_iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, ip)| u64::from(u16::from_be_bytes([ip[2], ip[3]])))
            .collect();
        (p.iter().sum(), p.len())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// One agent under measurement: its proxy port is what the capture sees.
struct Subject {
    label: &'static str,
    id: String,
    proxy: Proxy,
    cap: Capture,
    agent: Option<Agent>,
}

fn online_after(obs: &Observer, id: &str, from: usize) {
    let topic = format!("debfleet/device/{id}/status");
    wait_for(Duration::from_secs(60), "online", || {
        obs.messages()[from..].iter().any(|m| m.topic == topic && m.json()["state"] == "online").then_some(())
    });
}

fn kb(b: u64) -> String {
    format!("{:.2} KB", b as f64 / 1000.0)
}

fn mb(b: f64) -> String {
    format!("{:.3} MB", b / 1e6)
}

fn main() {
    let duration: u64 = std::env::var("DURATION").ok().and_then(|d| d.parse().ok()).unwrap_or(3600);
    let baseline = std::env::var_os("BASELINE_AGENT_BIN").map(PathBuf::from);
    let current = std::env::var_os("DEBFLEET_AGENT_BIN").map(PathBuf::from).expect("DEBFLEET_AGENT_BIN");
    let dir = tempfile::tempdir().unwrap();
    let m = Mosquitto::start();
    let obs = Observer::connect(m.port, &["debfleet/device/+/#"]);
    if std::env::var("INSTALL_ONLY").as_deref() == Ok("1") {
        install(&m, &obs, dir.path());
        return;
    }
    let mut kinds: Vec<(&'static str, PathBuf, &str)> = Vec::new();
    if let Some(b) = &baseline {
        kinds.push(("baseline (before)", b.clone(), ""));
    }
    kinds.push(("default profile", current.clone(), ""));
    kinds.push(("cellular profile", current.clone(), "profile = \"cellular\"\n"));

    // First connect.
    let mut subjects = Vec::new();
    let t0 = now_us();
    for (i, (label, bin, extra)) in kinds.iter().enumerate() {
        let proxy = Proxy::start(m.port);
        let cap = Capture::start(dir.path(), proxy.port);
        std::env::set_var("DEBFLEET_AGENT_BIN", bin);
        if label.starts_with("baseline") {
            std::env::set_var("DEBFLEET_AGENT_LEGACY", "1");
        } else {
            std::env::remove_var("DEBFLEET_AGENT_LEGACY");
        }
        let id = format!("wire-{i}");
        let agent = Agent::start(AgentSpec { id: &id, port: proxy.port, groups: &["bench"], extra });
        subjects.push(Subject { label, id, proxy, cap, agent: Some(agent) });
    }
    for s in &subjects {
        online_after(&obs, &s.id, 0);
    }
    // Long enough for what a connect sets off (the first log batch, 5 s later by default).
    std::thread::sleep(Duration::from_secs(8));
    let t1 = now_us();

    // One ping each.
    for s in &subjects {
        let id = format!("ping-{}", s.id);
        obs.publish(&format!("debfleet/device/{}/cmd/ping", s.id), format!(r#"{{"id":"{id}"}}"#).into_bytes(), false);
        obs.wait(&format!("debfleet/device/{}/op/{id}", s.id), Duration::from_secs(30), |v| v["state"] == "succeeded");
    }
    std::thread::sleep(Duration::from_secs(3));
    let t2 = now_us();

    // One reconnect each: the connection is cut (as a network drop would), the agent comes back.
    let from = obs.messages().len();
    for s in &subjects {
        s.proxy.cut_all();
    }
    for s in &subjects {
        online_after(&obs, &s.id, from);
    }
    std::thread::sleep(Duration::from_secs(8));
    let t3 = now_us();

    // Idle is measured in the steady state: after every agent's first telemetry, which for the
    // cellular profile is its first (five-minute) window's aggregate, sent whatever the deadband
    // (nothing was sent before it). After that an idle device's aggregates stay inside the
    // deadband.
    let first: Vec<Duration> = subjects
        .iter()
        .map(|s| {
            let topic = format!("debfleet/device/{}/telemetry", s.id);
            let aggregated = s.label.starts_with("cellular");
            wait_for(Duration::from_secs(2 * 3600), "the first telemetry", || {
                obs.messages()
                    .iter()
                    .any(|m| m.topic == topic && (!aggregated || m.json()["window_s"].is_u64()))
                    .then_some(())
            });
            Duration::from_micros(now_us() - t0)
        })
        .collect();
    std::thread::sleep(Duration::from_secs(8));
    let t4 = now_us();
    eprintln!("idle for {duration} s ...");
    std::thread::sleep(Duration::from_secs(duration));
    let t5 = now_us();

    let month = 30.0 * 86_400.0 / duration as f64;
    // `state/link` goes once a day (and on connects), so an idle hour does not hold one: the
    // month adds thirty, each as much as the last one this agent sent (none before issue 12).
    let links: Vec<u64> = subjects.iter().map(|s| s.cap.link_report(s.proxy.port, t5).unwrap_or(0)).collect();
    if std::env::var("WIRE_DUMP").as_deref() == Ok("1") {
        for s in &subjects {
            for (name, a, b) in [("connect", t0, t1), ("reconnect", t2, t3)] {
                let p = s.cap.dump(s.proxy.port, a, b);
                let text: Vec<String> =
                    p.iter().map(|(up, len, kind)| format!("{}{len}:{kind}", if *up { ">" } else { "<" })).collect();
                eprintln!("{} {name}: {}", s.label, text.join(" "));
            }
        }
    }
    println!("\nwire bytes per device, TCP/IP headers included (tcpdump on each agent's broker port)");
    println!("idle: {duration} s once every agent had sent its first telemetry, projected to 30 days,");
    println!("plus one state/link report a day (what the agent's last one cost: publish, PUBACK, ACK)");
    for (s, at) in subjects.iter().zip(&first) {
        println!("  {:<20} first telemetry {:>5} s after its start", s.label, at.as_secs());
    }
    println!();
    println!(
        "{:<20} {:>12} {:>14} {:>10} {:>14} {:>10} {:>12}",
        "agent", "connect", "idle (window)", "link/day", "idle / month", "ping", "reconnect"
    );
    let mut figures = Vec::new();
    for (s, link) in subjects.iter().zip(&links) {
        let connect = s.cap.between(t0, t1).0;
        let ping = s.cap.between(t1, t2).0;
        let reconnect = s.cap.between(t2, t3).0;
        let idle = s.cap.between(t4, t5);
        let per_month = idle.0 as f64 * month + 30.0 * *link as f64;
        println!(
            "{:<20} {:>12} {:>14} {:>10} {:>14} {:>10} {:>12}",
            s.label,
            kb(connect),
            format!("{} ({} pk)", kb(idle.0), idle.1),
            kb(*link),
            mb(per_month),
            kb(ping),
            kb(reconnect)
        );
        figures.push((s.label, per_month, reconnect));
    }
    println!("\nMQTT 5 topic aliases: what the idle window's publishes spent on topic names (an alias is 3 bytes)");
    for s in &subjects {
        let (n, topic_bytes) = s.cap.publishes_to(s.proxy.port, t4, t5);
        let saving = topic_bytes.saturating_sub(3 * n as u64) as f64 * month;
        println!("  {:<20} {n} publishes, {topic_bytes} topic bytes: at most {} a month", s.label, mb(saving));
    }
    let cell = figures.iter().find(|f| f.0 == "cellular profile").unwrap();
    let default = figures.iter().find(|f| f.0 == "default profile").unwrap();
    println!("\nratios to the goals (≤ 1 meets the goal)");
    println!("  idle cellular / 0.5 MB a month:   {:.2}", cell.1 / 0.5e6);
    println!("  reconnect cellular / 2 KB:        {:.2}", cell.2 as f64 / 2000.0);
    println!("  reconnect default / 2 KB:         {:.2}", default.2 as f64 / 2000.0);
    if let Some(b) = figures.iter().find(|f| f.0.starts_with("baseline")) {
        println!("  idle default / baseline:          {:.2}", default.1 / b.1.max(1.0));
        println!("  reconnect default / baseline:     {:.2}", default.2 as f64 / (b.2 as f64).max(1.0));
    }
    for s in &mut subjects {
        s.agent.take();
    }
    if std::env::var("INSTALL").as_deref() == Ok("0") {
        return;
    }
    install(&m, &obs, dir.path());
}

/// One install of a small package on a lab device per profile, as the agent's traffic for it.
fn install(m: &Mosquitto, obs: &Observer, dir: &Path) {
    let repo = RepoServer::start(&[]);
    let deb = debfleet_tests::repo::service_deb(dir, "wire-app", "1.0", false);
    assert!(repo.publish(&deb, "stable").status.success());
    println!(
        "\none install of a small package ({} bytes), the agent's MQTT traffic from command to result",
        std::fs::metadata(&deb).unwrap().len()
    );
    for (i, (label, extra)) in
        [("default profile", ""), ("cellular profile", "profile = \"cellular\"\n")].into_iter().enumerate()
    {
        let name = format!("wire-l{i}");
        let proxy = Proxy::start(m.port);
        let cap = Capture::start(dir, proxy.port);
        let dev = Device::boot(&name);
        let config = format!(
            "{extra}broker = \"mqtt://127.0.0.1:{}\"\nstate_dir = \"/var/lib/debfleet\"\n\n[apt]\nwatch_s = 2\n",
            proxy.port
        );
        dev.install_agent(&config, &repo);
        obs.wait(&format!("debfleet/device/{name}/status"), Duration::from_secs(60), |v| v["state"] == "online");
        std::thread::sleep(Duration::from_secs(5));
        let t0 = now_us();
        let id = format!("inst-{name}");
        obs.publish(
            &format!("debfleet/device/{name}/cmd/install"),
            format!(r#"{{"id":"{id}","packages":["wire-app"]}}"#).into_bytes(),
            false,
        );
        obs.wait(&format!("debfleet/device/{name}/op/{id}"), Duration::from_secs(300), |v| v["state"] == "succeeded");
        std::thread::sleep(Duration::from_secs(3));
        let (bytes, packets) = cap.between(t0, now_us());
        println!("  {label:<20} {} ({packets} packets)", kb(bytes));
    }
}
