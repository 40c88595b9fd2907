//! A rollout over many simulated devices (DEVICES, default 1,000): one MQTT connection per device
//! from this process, each answering like an agent (retained facts; an operation record, its
//! desired-state report and its package state for a record or a command; a share FAIL_PCT of them
//! failing with `unit_failed`), a real Mosquitto, and the release `debfleet rollout run` as the
//! controller. Prints the controller's CPU and peak memory, the time from a wave's last result to
//! the next wave's first record (goal: under 1 s), and broker messages per device, against the
//! anchor in the same run: a plain `debfleet upgrade --group` of the same devices (goal: a
//! rollout costs no more than that plus the desired-state record). Run by bench/rollout.sh.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use debfleet_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};

/// What the simulated devices saw and did, for the figures.
#[derive(Default)]
struct Log {
    /// When each device got its record from the rollout.
    asked: BTreeMap<String, Instant>,
    /// When each device published its result.
    answered: BTreeMap<String, Instant>,
}

fn ts() -> String {
    debfleet_protocol::time::now()
}

async fn device(port: u16, id: String, fails: bool, log: Arc<Mutex<Log>>, ready: tokio::sync::mpsc::Sender<()>) {
    let mut opts = MqttOptions::new(&id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(120));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut el) = AsyncClient::new(opts, 32);
    let dev = |t: &str| format!("debfleet/device/{id}/{t}");
    let meta = json!({
        "v": 1, "device_id": id, "agent_version": "0.1.0", "hostname": id,
        "os": {"id": "debian", "version_id": "12", "pretty_name": "Debian GNU/Linux 12 (bookworm)"},
        "arch": "amd64", "kernel": "6.1.0", "boot_id": "b", "groups": ["bench"],
        "commands": ["ping", "refresh", "restart", "cfg", "clear", "install", "upgrade", "uninstall", "rollback"]
    });
    let status = json!({"v": 1, "state": "online", "since": ts(), "boot_id": "b"});
    let packages = |v: &str| json!({"v": 1, "ts": ts(), "packages": {"app": {"version": v, "status": "installed"}}});
    let cfg = debfleet_protocol::CfgMessage { v: 1, cfg: debfleet_protocol::RuntimeCfg::default() };
    let facts = [
        (dev("meta"), meta),
        (dev("cfg"), serde_json::to_value(&cfg).unwrap()),
        (dev("status"), status),
        (dev("state/units"), json!({"v": 1, "ts": ts(), "units": {}})),
        (dev("state/packages"), packages("1.0")),
    ];
    for (t, v) in facts {
        client.publish(t, QoS::AtLeastOnce, true, v.to_string()).await.unwrap();
    }
    client.subscribe(format!("debfleet/desired/device/{id}"), QoS::AtLeastOnce).await.unwrap();
    client.subscribe("debfleet/group/bench/cmd/+", QoS::AtLeastOnce).await.unwrap();
    let mut ready = Some(ready);
    let mut desired_ops = 0;
    loop {
        let ev = match el.poll().await {
            Ok(ev) => ev,
            Err(e) => panic!("{id}: {e}"),
        };
        let p = match ev {
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(()).await;
                }
                continue;
            }
            Event::Incoming(Packet::Publish(p)) => p,
            _ => continue,
        };
        let Ok(msg) = serde_json::from_slice::<Value>(&p.payload) else { continue };
        let now = ts();
        // What an agent publishes for an operation: running, then its end, then the packages.
        let (op, verb, version, revision) = if p.topic.contains("/cmd/") {
            let Some(op) = msg["id"].as_str() else { continue };
            (op.to_owned(), "upgrade", "2.0".to_owned(), None)
        } else {
            log.lock().unwrap().asked.entry(id.clone()).or_insert_with(Instant::now);
            desired_ops += 1;
            let v = msg["packages"]["app"].as_str().unwrap_or("2.0").to_owned();
            (format!("desired-{desired_ops}"), "install", v, msg["revision"].as_u64())
        };
        let report = |state: Value| {
            let mut r = json!({"v": 1, "ts": now, "revisions": {"device": revision}, "packages": {"app": version}});
            r.as_object_mut().unwrap().extend(state.as_object().unwrap().clone());
            r
        };
        let mut out = vec![(
            dev(&format!("op/{op}")),
            json!({"v": 1, "id": op, "verb": verb, "state": "running", "accepted_at": now, "updated_at": now, "phase": "downloading"}),
        )];
        if revision.is_some() {
            out.push((dev("state/desired"), report(json!({"state": "converging", "op": op}))));
        }
        let error = json!({"code": "unit_failed", "message": "app.service failed after the change"});
        if fails {
            out.push((
                dev(&format!("op/{op}")),
                json!({"v": 1, "id": op, "verb": verb, "state": "failed", "accepted_at": now, "updated_at": now, "error": error}),
            ));
        } else {
            let result = json!({"changes": [{"package": "app", "before": "1.0", "after": version}], "download_bytes": 2048, "duration_ms": 900});
            out.push((
                dev(&format!("op/{op}")),
                json!({"v": 1, "id": op, "verb": verb, "state": "succeeded", "accepted_at": now, "updated_at": now, "result": result}),
            ));
            out.push((dev("state/packages"), packages(&version)));
        }
        if revision.is_some() {
            let end = if fails {
                json!({"state": "blocked", "op": op, "error": error})
            } else {
                json!({"state": "converged"})
            };
            out.push((dev("state/desired"), report(end)));
        }
        for (t, v) in out {
            client.publish(t, QoS::AtLeastOnce, true, v.to_string()).await.unwrap();
        }
        if revision.is_some() {
            log.lock().unwrap().answered.insert(id.clone(), Instant::now());
        }
    }
}

/// Counts what the broker delivers under `debfleet/#`, by kind.
fn counter(port: u16) -> Arc<Mutex<BTreeMap<&'static str, (u64, u64)>>> {
    let counts: Arc<Mutex<BTreeMap<&'static str, (u64, u64)>>> = Arc::default();
    let c = counts.clone();
    let mut opts = rumqttc::MqttOptions::new("bench-counter", "127.0.0.1", port);
    opts.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 4096);
    client.subscribe("debfleet/#", QoS::AtMostOnce).unwrap();
    std::thread::spawn(move || {
        let _keep = client;
        for ev in conn.iter() {
            let Ok(Event::Incoming(Packet::Publish(p))) = ev else { continue };
            if p.retain {
                continue;
            }
            let kind = match p.topic.as_str() {
                t if t.starts_with("debfleet/desired/device/") => "desired record (device)",
                t if t.starts_with("debfleet/desired/group/") => "desired record (group)",
                t if t.starts_with("debfleet/rollout/") && t.ends_with("/lease") => "rollout lease",
                t if t.starts_with("debfleet/rollout/") => "rollout state/spec/control",
                t if t.ends_with("/state/desired") => "device: desired-state report",
                t if t.contains("/op/") => "device: operation record",
                t if t.ends_with("/state/packages") => "device: package state",
                t if t.contains("/cmd/") => "command",
                _ => "other",
            };
            let mut m = c.lock().unwrap();
            let e = m.entry(kind).or_default();
            e.0 += 1;
            e.1 += p.payload.len() as u64;
        }
    });
    counts
}

fn proc_figures(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks / hz, hwm))
}

fn main() {
    let n: usize = std::env::var("DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let fail_pct: usize = std::env::var("FAIL_PCT").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let console = std::env::var("DEBFLEET_BIN").unwrap_or_else(|_| bin("debfleet").display().to_string());
    let m = Mosquitto::start();
    let log: Arc<Mutex<Log>> = Arc::default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(n);
    let ids: Vec<String> = (0..n).map(|i| format!("sim-{i:04}")).collect();
    // Every hundredth device fails (FAIL_PCT per hundred), spread over the waves.
    for (i, id) in ids.iter().enumerate() {
        let fails = i % 100 < fail_pct && i > 0;
        rt.spawn(device(m.port, id.clone(), fails, log.clone(), ready_tx.clone()));
    }
    rt.block_on(async {
        for _ in 0..n {
            ready_rx.recv().await.unwrap();
        }
    });
    eprintln!("{n} simulated devices connected");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&console).args(args).env("DEBFLEET_BROKER", m.url()).output().unwrap();
        assert!(
            out.status.success() || out.status.code() == Some(1),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // The anchor: a plain upgrade of the same devices.
    let counts = counter(m.port);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    run(&["upgrade", "--group", "bench", "app", "--json", "--timeout", "120"]);
    let upgrade_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let upgrade: BTreeMap<&str, (u64, u64)> = std::mem::take(&mut *counts.lock().unwrap());

    // The rollout, driven by the real controller (started after the rollout exists: it stops
    // once no rollout has anything left to do).
    let max_failures = (n * fail_pct / 100 + 1).to_string();
    let started = Instant::now();
    run(&[
        "rollout",
        "create",
        "--group",
        "bench",
        "--id",
        "bench",
        "app=3.0",
        "--waves",
        "1%,10%,50%,100%",
        "--watch",
        "0s",
        "--success",
        "90%",
        "--max-failures",
        &max_failures,
    ]);
    let mut ctl = std::process::Command::new(&console)
        .args(["rollout", "run", "--exit-when-done"])
        .env("DEBFLEET_BROKER", m.url())
        .spawn()
        .unwrap();
    let mut figures = (0.0, 0);
    loop {
        if let Some(f) = proc_figures(ctl.id()) {
            figures = f;
        }
        if ctl.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(600) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctl.kill();
    let rollout_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let rollout: BTreeMap<&str, (u64, u64)> = std::mem::take(&mut *counts.lock().unwrap());
    let status: Value = serde_json::from_str(&run(&["rollout", "status", "bench", "--json"])).unwrap();
    let state = &status["state"];

    // The gaps: each wave's first record after the wave before's last result.
    let log = log.lock().unwrap();
    let mut waves: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for (d, e) in state["devices"].as_object().unwrap() {
        waves.entry(e["wave"].as_u64().unwrap()).or_default().push(d);
    }
    let mut gaps = Vec::new();
    for (w, devs) in &waves {
        let Some(before) = waves.get(&(w.wrapping_sub(1))) else { continue };
        let last = before.iter().filter_map(|d| log.answered.get(*d)).max();
        let first = devs.iter().filter_map(|d| log.asked.get(*d)).min();
        if let (Some(l), Some(f)) = (last, first) {
            gaps.push(f.saturating_duration_since(*l).as_secs_f64());
        }
    }
    let per = |m: &BTreeMap<&str, (u64, u64)>| {
        let msgs: u64 = m.values().map(|v| v.0).sum();
        let bytes: u64 = m.values().map(|v| v.1).sum();
        (msgs as f64 / n as f64, bytes as f64 / n as f64)
    };
    println!("rollout over {n} simulated devices ({fail_pct}% failing), waves 1%,10%,50%,100%, watch 0 s");
    println!("  phase: {} ({})", state["phase"], state["reason"].as_str().unwrap_or(""));
    println!("  controller (release debfleet rollout run): {:.2} s CPU, peak {} KiB resident", figures.0, figures.1);
    println!("  rollout took {rollout_s:.1} s; the plain upgrade {upgrade_s:.1} s");
    let gap_text: Vec<String> = gaps.iter().map(|g| format!("{g:.2} s")).collect();
    let worst = gaps.iter().cloned().fold(0.0, f64::max);
    println!(
        "  from a wave's last result to the next wave's first record: {} (worst {worst:.2} s; goal under 1 s)",
        gap_text.join(", ")
    );
    println!("  broker messages by kind (live, not retained copies):");
    println!("    {:<34} {:>10} {:>10}", "kind", "upgrade", "rollout");
    let kinds: std::collections::BTreeSet<&str> = upgrade.keys().chain(rollout.keys()).cloned().collect();
    for k in kinds {
        let u = upgrade.get(k).map_or(0, |v| v.0);
        let r = rollout.get(k).map_or(0, |v| v.0);
        println!("    {k:<34} {u:>10} {r:>10}");
    }
    let (um, ub) = per(&upgrade);
    let (rm, rb) = per(&rollout);
    println!("  per device: upgrade {um:.2} messages ({ub:.0} B), rollout {rm:.2} messages ({rb:.0} B)");
    println!("  rollout / (upgrade + the record): {:.2}x messages (goal at most 1.0x)", rm / (um + 1.0));
}
