//! The ROS bridge's throughput and cost (bench/ros-bridge.sh). A 100 Hz `nav_msgs/Odometry`
//! stream (`rostopic pub -s -r 100`, each message stamped as it is published) goes through the
//! bridge and the agent users get (the .debs' static binaries) to a real Mosquitto:
//!  - with the default path of the issue — decimated to 1 Hz — the bridge's CPU (share of one
//!    core) and resident memory (goals: at most 5 % and 8 MiB);
//!  - the latency from the ROS publish (`header.stamp`) to the MQTT delivery, p50/p99/max, at 1 Hz
//!    and with every message forwarded (100 Hz), beside `rostopic echo`'s own latency (its
//!    receive time against the same stamps, `rostopic echo -p --offset`) in the same run (goal:
//!    p99 at most 20 ms).

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use debfleet_tests::ros::RosMaster;
use debfleet_tests::*;

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Stream samples as they arrive: (arrival, the message's stamp).
fn mqtt_latencies(port: u16, topic: &str) -> Arc<Mutex<Vec<(f64, f64)>>> {
    let out: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let mut opts = rumqttc::MqttOptions::new(format!("bench-{}", rand_u32()), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 100);
    client.subscribe(topic, rumqttc::QoS::AtMostOnce).unwrap();
    let o = out.clone();
    std::thread::spawn(move || {
        let _client = client;
        for ev in conn.iter() {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = ev {
                let at = now_s();
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                let st = &v["value"]["header"]["stamp"];
                if let (Some(s), Some(n)) = (st["secs"].as_f64(), st["nsecs"].as_f64()) {
                    o.lock().unwrap().push((at, s + n / 1e9));
                }
            }
        }
    });
    out
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with(key)).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn quantiles(mut ms: Vec<f64>) -> (usize, f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    (ms.len(), q(0.5), q(0.99), *ms.last().unwrap())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let m = Mosquitto::start();
    let master = RosMaster::start();
    let agent = Agent::start(AgentSpec { id: "bench-ros", port: m.port, groups: &[], extra: "" });
    let dir = tempfile::tempdir().unwrap();
    let exe =
        std::env::var("DEBFLEET_ROS_BRIDGE_BIN").unwrap_or_else(|_| bin("debfleet-ros-bridge").display().to_string());
    let bridge = Command::new(&exe)
        .envs(master.env())
        .env("DEBFLEET_SOCKET", agent.socket())
        .env("STATE_DIRECTORY", dir.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = bridge.id();
    let _bridge = Killed(bridge);
    let stream = "debfleet/device/bench-ros/components/ros-bridge/stream";
    let samples = mqtt_latencies(m.port, stream);
    let configure = |decimate: u32| {
        let subs = serde_json::json!({"odom": {"topic": "/odom", "decimate": decimate,
            "fields": ["header.stamp", "pose.pose.position", "twist.twist.linear"]}});
        let (code, _, text) = console_result(
            &m.url(),
            &["component", "cfg", "bench-ros", "ros-bridge", &format!("subscriptions={subs}")],
        );
        assert_eq!(code, Some(0), "{text}");
    };
    wait_for(Duration::from_secs(30), "the bridge", || {
        let (code, _, _) = console_result(&m.url(), &["component", "call", "bench-ros", "ros-bridge", "state"]);
        (code == Some(0)).then_some(())
    });
    configure(100);
    // -s: each message stamped anew as it is published.
    let publisher = master
        .command("rostopic")
        .args(["pub", "-s", "-r", "100", "/odom", "nav_msgs/Odometry"])
        .arg("{header: {stamp: now, frame_id: odom}, pose: {pose: {position: {x: 1.0, y: 2.0}}}, twist: {twist: {linear: {x: 0.5}}}}")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // rostopic's own latency: with --offset, the stamp as an offset (ns) from its receive time.
    let _publisher = Killed(publisher);
    let echo = master.echo_with("/odom", &["--offset"]);
    wait_for(Duration::from_secs(30), "the first sample", || (!samples.lock().unwrap().is_empty()).then_some(()));
    std::thread::sleep(Duration::from_secs(3));

    // 1 Hz, the default path: cost over 60 s.
    const RUN: u64 = 60;
    samples.lock().unwrap().clear();
    let echo_before = echo.lines().len();
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    let mut rss_peak = 0;
    while t0.elapsed() < Duration::from_secs(RUN) {
        std::thread::sleep(Duration::from_millis(500));
        rss_peak = rss_peak.max(status_kib(pid, "VmRSS:"));
    }
    let (elapsed, c1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid));
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (c1 - c0) as f64 / hz / elapsed * 100.0;
    let in_rate = (echo.lines().len() - echo_before) as f64 / elapsed;
    let slow: Vec<f64> = samples.lock().unwrap().iter().map(|(a, s)| (a - s) * 1000.0).collect();
    let out_rate = slow.len() as f64 / elapsed;

    // Every message forwarded: latency over 20 s.
    configure(1);
    std::thread::sleep(Duration::from_secs(2));
    samples.lock().unwrap().clear();
    let lines_before = echo.lines().len();
    std::thread::sleep(Duration::from_secs(20));
    let fast: Vec<f64> = samples.lock().unwrap().iter().map(|(a, s)| (a - s) * 1000.0).collect();
    let lines = echo.lines();
    let head: Vec<&str> = lines[0].split(',').collect();
    let si = head.iter().position(|h| *h == "field.header.stamp").expect("a stamp column");
    let ros: Vec<f64> =
        lines[lines_before..].iter().filter_map(|l| Some(-l.split(',').nth(si)?.parse::<f64>().ok()? / 1e6)).collect();
    let rss_end = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");

    println!("ROS bridge: nav_msgs/Odometry at {in_rate:.0} Hz in (rostopic pub -s -r 100), {exe}");
    println!("decimated to 1 Hz (decimate 100), {RUN} s: {out_rate:.2} samples/s out");
    println!(
        "  bridge CPU {cpu:.2} % of a core (goal <= 5 %: {:.2}x)   RSS peak {rss_peak} KiB, VmHWM {hwm} KiB, now {rss_end} KiB (goal <= 8 MiB: {:.2}x)",
        cpu / 5.0,
        hwm as f64 / 8192.0
    );
    for (what, v) in [("bridge, 1 Hz", slow), ("bridge, every message", fast), ("rostopic echo", ros)] {
        if v.is_empty() {
            println!("  {what:<24} no samples");
            continue;
        }
        let (n, p50, p99, max) = quantiles(v);
        println!("  latency {what:<24} n={n:<5} p50 {p50:6.2} ms  p99 {p99:6.2} ms  max {max:6.2} ms  (goal p99 <= 20 ms: {:.2}x)", p99 / 20.0);
    }
}
