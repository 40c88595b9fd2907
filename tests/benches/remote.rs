//! Remote sessions against ssh into the same lab device, in the same run (bench/remote.sh):
//!  - interactive latency: a keystroke typed into `debfleet shell` (through a real Mosquitto and
//!    the device's agent) until its echo shows, against `ssh -tt` to the device's sshd (Debian's
//!    openssh-server, installed in the device for this run);
//!  - bulk output: 50 MB from `head -c` through each;
//!  - forward throughput: 20 MB echoed through `debfleet forward` and through `ssh -L` to the same
//!    service in the device;
//!  - a followed journal: a unit's line to the console's output (`logs --follow`);
//!  - the agent's resident memory at rest and at its peak during the sessions (goals: at rest
//!    under 5 MiB, a session adds under 1 MiB).
//!
//! The agent is the one users get (the .deb from scripts/build-debs.sh).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use debfleet_tests::lab::Device;
use debfleet_tests::repo::RepoServer;
use debfleet_tests::terminal::Interactive;
use debfleet_tests::*;

const KEYSTROKES: usize = 200;
const BULK: usize = 50_000_000;
const FORWARD: usize = 20_000_000;

fn debfleet(m: &Mosquitto) -> Command {
    let mut c = Command::new(bin("debfleet"));
    c.env("DEBFLEET_BROKER", m.url());
    c
}

fn ssh(key: &std::path::Path, port: u16) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-i"]).arg(key).args([
        "-p",
        &port.to_string(),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
    ]);
    c
}

/// Milliseconds from a keystroke to its echo, KEYSTROKES times; the terminal shows a prompt
/// first (`ready`).
fn keystrokes(mut term: Interactive, ready: &str) -> Vec<f64> {
    term.wait_text(ready);
    std::thread::sleep(Duration::from_millis(500));
    let mut rtts = Vec::new();
    for i in 0..KEYSTROKES {
        let before = term.shown();
        let t = Instant::now();
        term.send(if i % 40 == 39 { b"\x15" } else { b"x" });
        while term.shown() == before {
            assert!(t.elapsed() < Duration::from_secs(10), "no echo");
            std::thread::sleep(Duration::from_micros(50));
        }
        if i % 40 != 39 {
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        // Let the echo settle (a line kill echoes more than one byte).
        std::thread::sleep(Duration::from_millis(5));
    }
    term.send(b"\x15exit\r");
    let _ = term.wait_exit();
    rtts
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Seconds to send FORWARD bytes through `port` and read them all back.
fn echo_through(port: u16) -> f64 {
    let mut conn = wait_for(Duration::from_secs(20), "the forwarded port", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let data: Vec<u8> = (0..FORWARD).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    let mut reader = conn.try_clone().unwrap();
    let back = std::thread::spawn(move || {
        let mut got = vec![0u8; FORWARD];
        reader.read_exact(&mut got).map(|_| got)
    });
    conn.write_all(&data).unwrap();
    let got = back.join().unwrap().expect("the echo");
    let took = t.elapsed().as_secs_f64();
    assert!(got == data, "the echo differs");
    took
}

fn agent_rss(dev: &Device) -> (u64, u64) {
    let pid = dev.ok(&["systemctl", "show", "-p", "MainPID", "--value", "debfleet-agent"]);
    let status = dev.ok(&["cat", &format!("/proc/{}/status", pid.trim())]);
    let field = |f: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(f)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let m = Mosquitto::start();
    let repo = RepoServer::start(&[]);
    let dev = Device::boot("rb-1");
    // Debian's openssh-server, from the mirror the lab's rootfs came from (before the agent's
    // setup points apt at our repository only).
    if let Ok(conf) = std::fs::read_to_string("/etc/apt/apt.conf.d/99artifact-registry") {
        dev.write("/etc/apt/apt.conf.d/99artifact-registry", &conf);
    }
    dev.ok(&["apt-get", "update", "-q"]);
    dev.ok(&["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", "openssh-server"]);
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("id");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    dev.ok(&["mkdir", "-p", "-m", "0700", "/root/.ssh"]);
    dev.write("/root/.ssh/authorized_keys", &std::fs::read_to_string(key.with_extension("pub")).unwrap());
    let ssh_port = free_port();
    dev.write("/etc/ssh/sshd_config.d/bench.conf", &format!("Port {ssh_port}\nListenAddress 127.0.0.1\n"));
    dev.ok(&["systemctl", "restart", "ssh"]);
    // The service both forwards reach: an echo server in the device.
    let echo = free_port();
    dev.ok(&[
        "systemd-run",
        "--unit=rb-echo",
        "systemd-socket-activate",
        "--inetd",
        "--accept",
        &format!("--listen=127.0.0.1:{echo}"),
        "cat",
    ]);
    let config = format!(
        "broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\njournal_any_unit = true\n\n[remote]\nshell = true\nuser = \"root\"\nforward = [\"127.0.0.1:{echo}\"]\n",
        m.url()
    );
    dev.install_agent(&config, &repo);
    let obs = Observer::connect(m.port, &["debfleet/device/rb-1/status"]);
    obs.wait("debfleet/device/rb-1/status", Duration::from_secs(30), |v| v["state"] == "online");
    wait_for(Duration::from_secs(20), "sshd", || {
        ssh(&key, ssh_port).args(["root@127.0.0.1", "true"]).stdin(Stdio::null()).status().ok()?.success().then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let (rest, _) = agent_rss(&dev);

    // Keystroke to echo.
    let mut shell = debfleet(&m);
    shell.args(["shell", "rb-1"]);
    let mut ours = keystrokes(Interactive::start(shell, 80, 24), "shell on rb-1");
    let mut theirs = {
        let mut c = ssh(&key, ssh_port);
        c.args(["-tt", "root@127.0.0.1"]);
        keystrokes(Interactive::start(c, 80, 24), "#")
    };

    // A followed journal: a unit printing its clock every 100 ms (the device shares this
    // machine's clock), each line's arrival at the console.
    dev.ok(&["systemd-run", "--unit=rb-tick", "sh", "-c", "while true; do date +%s%N; sleep 0.1; done"]);
    let mut follow = debfleet(&m)
        .args(["logs", "rb-1", "rb-tick.service", "--lines", "1", "--json", "--follow", "6s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut follow_ms = Vec::new();
    {
        use std::io::BufRead;
        let lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
        for (i, line) in lines.map_while(Result::ok).enumerate() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i128;
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let sent: i128 = v["message"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
            // The first line is from before following began.
            if i > 0 && sent > 0 {
                follow_ms.push((now - sent) as f64 / 1e6);
            }
        }
    }
    let _ = follow.wait();
    dev.ok(&["systemctl", "stop", "rb-tick"]);
    assert!(follow_ms.len() > 20, "only {} followed lines", follow_ms.len());

    // Bulk output.
    let bulk = |mut c: Command| {
        let t = Instant::now();
        let out = c.stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout.len(), BULK);
        t.elapsed().as_secs_f64()
    };
    let cmd = format!("head -c {BULK} /dev/urandom");
    let mut c = debfleet(&m);
    c.args(["shell", "rb-1", "--", &cmd]);
    let bulk_ours = bulk(c);
    let (_, peak_shell) = agent_rss(&dev);
    let mut c = ssh(&key, ssh_port);
    c.args(["root@127.0.0.1", &cmd]);
    let bulk_theirs = bulk(c);

    // Forward throughput.
    let local = free_port();
    let mut fwd = debfleet(&m)
        .args(["forward", "rb-1", &format!("{local}:127.0.0.1:{echo}")])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fwd_ours = echo_through(local);
    let (_, peak) = agent_rss(&dev);
    // Ctrl-C: the console closes the session (a killed one would leave it to the device's 20 s).
    unsafe { libc::kill(fwd.id() as i32, libc::SIGINT) };
    let _ = fwd.wait();
    let local2 = free_port();
    let mut tunnel = ssh(&key, ssh_port)
        .args(["-N", "-L", &format!("{local2}:127.0.0.1:{echo}"), "root@127.0.0.1"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let fwd_theirs = echo_through(local2);
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    std::thread::sleep(Duration::from_secs(3));
    let (after, _) = agent_rss(&dev);

    let mb = |bytes: usize, s: f64| bytes as f64 / 1e6 / s;
    println!("remote sessions on lab device rb-1 (Mosquitto on 127.0.0.1), against ssh in the same run");
    println!("| measure | debfleet | ssh | ratio |");
    println!("|---|---|---|---|");
    let (o50, t50) = (pct(&mut ours, 0.5), pct(&mut theirs, 0.5));
    let (o99, t99) = (pct(&mut ours, 0.99), pct(&mut theirs, 0.99));
    println!("| keystroke to echo, median ({} keys) | {o50:.2} ms | {t50:.2} ms | {:.2}x |", ours.len(), o50 / t50);
    println!("| keystroke to echo, p99 | {o99:.2} ms | {t99:.2} ms | {:.2}x |", o99 / t99);
    println!(
        "| 50 MB of output | {:.1} MB/s | {:.1} MB/s | {:.2}x |",
        mb(BULK, bulk_ours),
        mb(BULK, bulk_theirs),
        mb(BULK, bulk_ours) / mb(BULK, bulk_theirs)
    );
    println!(
        "| forward, 20 MB echoed | {:.1} MB/s | {:.1} MB/s | {:.2}x |",
        mb(FORWARD, fwd_ours),
        mb(FORWARD, fwd_theirs),
        mb(FORWARD, fwd_ours) / mb(FORWARD, fwd_theirs)
    );
    let (f50, f99) = (pct(&mut follow_ms, 0.5), pct(&mut follow_ms, 0.99));
    println!(
        "logs --follow: a unit's line to the console's output, median {f50:.0} ms, p99 {f99:.0} ms, max {:.0} ms ({} lines)",
        pct(&mut follow_ms, 1.0),
        follow_ms.len()
    );
    println!(
        "agent RSS: {rest} KiB at rest before ({:.2}x the 5 MiB goal), peak {} KiB during the shell's 50 MB, peak {peak} KiB after the forward (+{} KiB over rest: {:.2}x the 1 MiB goal), {after} KiB at rest after",
        rest as f64 / 5120.0,
        peak_shell,
        peak.saturating_sub(rest),
        peak.saturating_sub(rest) as f64 / 1024.0
    );
}
