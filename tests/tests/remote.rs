//! Remote sessions against a real Mosquitto and real agents (on this host, as root, so the
//! terminal runs root's shell): `debfleet shell` runs commands and returns their status, sees
//! resizes, delivers 50 MB whole and in order within the agent's memory bound; a foreign client
//! on the session's topics achieves nothing; a killed console leaves no process behind;
//! `debfleet forward` reaches a service; both are refused when the device does not allow them.
//! (The demo test opens a shell on a lab device.)

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use debfleet_tests::terminal::Interactive;
use debfleet_tests::*;

fn debfleet(m: &Mosquitto) -> Command {
    let mut c = Command::new(bin("debfleet"));
    c.env("DEBFLEET_BROKER", m.url()).env("USER", "ops-ana");
    c
}

fn remote_agent(id: &str, m: &Mosquitto, forward_port: u16) -> Agent {
    remote_agent_idle(id, m, forward_port, 300)
}

fn remote_agent_idle(id: &str, m: &Mosquitto, forward_port: u16, idle_s: u64) -> Agent {
    let extra = format!(
        "[remote]\nshell = true\nuser = \"root\"\nforward = [\"127.0.0.1:{forward_port}\"]\nidle_timeout_s = {idle_s}\n"
    );
    let a = Agent::start(AgentSpec { id, port: m.port, groups: &[], extra: &extra });
    wait_online(m, id);
    a
}

fn wait_online(m: &Mosquitto, id: &str) {
    let obs = Observer::connect(m.port, &[&format!("debfleet/device/{id}/status")]);
    obs.wait(&format!("debfleet/device/{id}/status"), Duration::from_secs(20), |v| v["state"] == "online");
}

fn vm_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn shell_runs_commands_sees_resizes_returns_status_and_shrugs_off_foreign_frames() {
    let m = Mosquitto::start();
    let agent = remote_agent("rs-1", &m, free_port());
    // The web console keeps the audit log: sessions opened from the command line go in too.
    let web_dir = tempfile::tempdir().unwrap();
    let (users, audit) = (web_dir.path().join("users"), web_dir.path().join("audit.log"));
    debfleet_tests::repo::add_web_user(&bin("debfleet"), &users, "admin", "admin", "correct horse battery");
    let _web = KillOnDrop(
        debfleet(&m)
            .args(["web", "--listen", &format!("127.0.0.1:{}", free_port()), "--users"])
            .arg(&users)
            .arg("--audit")
            .arg(&audit)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(2));

    // One command, not on a terminal: its output byte for byte, its status ours.
    let out = debfleet(&m)
        .args(["shell", "rs-1", "--", "printf 'a\\nb\\r\\n'; echo err >&2; exit 3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"a\nb\r\nerr\n");
    // Killed by a signal: 128 + the signal, as a local shell would say.
    let out = debfleet(&m).args(["shell", "rs-1", "--", "kill -TERM $$"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(128 + 15), "{}\n{}", String::from_utf8_lossy(&out.stderr), agent.log());

    // Interactive: a login shell on a terminal of the console's size, resized live.
    let obs = Observer::connect(m.port, &["debfleet/session/#", "debfleet/device/rs-1/op/#"]);
    let mut cmd = debfleet(&m);
    cmd.args(["shell", "rs-1"]);
    let mut term = Interactive::start(cmd, 100, 30);
    term.wait_text("shell on rs-1");
    term.type_line("stty size; echo marker-$((6*7))");
    term.wait_text("marker-42");
    assert!(term.text().contains("30 100"), "{}", term.text());
    term.resize(132, 41);
    std::thread::sleep(Duration::from_millis(500));
    term.type_line("stty size; echo resized-$((6*7))");
    term.wait_text("resized-42");
    assert!(term.text().contains("41 132"), "{}", term.text());

    // A foreign client (it can write the session's topics, but did not open the session): its
    // frames, sealed with a key of its own or not at all, do nothing and break nothing.
    let topic_out = wait_for(Duration::from_secs(10), "session output", || {
        obs.messages().into_iter().find(|m| m.topic.ends_with("/out")).map(|m| m.topic)
    });
    let topic_in = topic_out.replace("/out", "/in");
    let session = topic_in.split('/').nth(3).unwrap().to_owned();
    let marker = format!("/tmp/debfleet-pwned-{}", rand_u32());
    let mut forger = {
        use debfleet_protocol::session::KeyPair;
        let (eve, device_side) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
        let device_pub = device_side.public();
        eve.agree(&device_pub, &session, true).unwrap()
    };
    for seq in 0..40u64 {
        let frame =
            debfleet_protocol::session::Frame::Data { stream: 0, bytes: format!("touch {marker}\r").into_bytes() };
        let mut sealed = forger.seal(&frame);
        sealed[..8].copy_from_slice(&seq.to_be_bytes());
        obs.publish(&topic_in, sealed, false);
    }
    obs.publish(&topic_in, format!("touch {marker}\r").into_bytes(), false);
    obs.publish(&topic_in, vec![0u8; 70_000], false);
    obs.publish(&topic_in, Vec::new(), false);
    std::thread::sleep(Duration::from_secs(1));
    term.type_line("echo still-$((40+2))");
    term.wait_text("still-42");
    assert!(!std::path::Path::new(&marker).exists(), "a forged frame ran a command");
    assert!(agent.log().contains("ignoring a message"), "{}", agent.log());

    // The shell's exit status is the console's; the operation records the session.
    term.type_line("exit 7");
    assert_eq!(term.wait_exit(), Some(7), "{}", term.text());
    let op_topic = topic_out.replace("debfleet/session/rs-1/", "debfleet/device/rs-1/op/").replace("/out", "");
    let record = obs.wait(&op_topic, Duration::from_secs(10), |v| v["state"] == "succeeded");
    assert_eq!(record["result"]["exit"]["code"], 7, "{record}");
    assert_eq!(record["by"], "ops-ana", "{record}");
    assert!(record["result"]["bytes_out"].as_u64().unwrap() > 0, "{record}");

    // The audit log: each session's start and end, with the operator, the device and how it
    // ended; the chain verifies.
    let op = record["id"].as_str().unwrap().to_owned();
    let lines = wait_for(Duration::from_secs(10), "the session's end in the audit log", || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let mine: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["detail"].as_str().is_some_and(|d| d.starts_with(&op)))
            .collect();
        (mine.len() == 2).then_some(mine)
    });
    assert_eq!(
        (lines[0]["action"].as_str(), lines[1]["action"].as_str()),
        (Some("shell session start"), Some("shell session end"))
    );
    for e in &lines {
        assert_eq!((e["user"].as_str(), e["target"].as_str()), (Some("ops-ana"), Some("device/rs-1")), "{e}");
    }
    assert!(lines[1]["detail"].as_str().unwrap().contains("\"duration_s\""), "{}", lines[1]);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(text.matches("session start").count(), text.matches("session end").count(), "{text}");
    let out = debfleet(&m).args(["audit", "verify"]).arg(&audit).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fifty_megabytes_arrive_whole_and_in_order_within_the_agents_memory_bound() {
    let m = Mosquitto::start();
    let agent = remote_agent("rs-2", &m, free_port());
    // A warm-up session, so what the session machinery itself costs is in the baseline.
    let out = debfleet(&m).args(["shell", "rs-2", "--", "true"]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let before = vm_kib(agent.pid(), "VmRSS:");
    let started = Instant::now();
    let out = debfleet(&m).args(["shell", "rs-2", "--", "seq 1 6500000"]).stdin(Stdio::null()).output().unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = Command::new("seq").args(["1", "6500000"]).output().unwrap().stdout;
    assert!(want.len() > 50_000_000);
    assert_eq!(out.stdout.len(), want.len());
    assert!(out.stdout == want, "the output differs from seq's own");
    let peak = vm_kib(agent.pid(), "VmHWM:");
    eprintln!(
        "50 MB session: {:.1} s ({:.1} MB/s); agent RSS {before} KiB before, peak {peak} KiB",
        took.as_secs_f64(),
        want.len() as f64 / 1e6 / took.as_secs_f64()
    );
    // The window bounds what the session holds (256 KiB each way, a few copies on the way to
    // the broker): the agent's peak stays within 4 MiB of its resting size.
    assert!(peak < before + 4096, "peak {peak} KiB against {before} KiB at rest");
}

#[test]
fn a_killed_console_leaves_nothing_behind_and_sessions_are_refused_where_not_allowed() {
    let m = Mosquitto::start();
    let mut agent = remote_agent("rs-3", &m, free_port());
    let obs = Observer::connect(m.port, &["debfleet/device/rs-3/op/#"]);
    let nap = format!("{}.5", 3000 + rand_u32() % 1000);
    let mut console = debfleet(&m)
        .args(["shell", "rs-3", "--", &format!("sleep {nap} & sleep {nap}")])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let running = |nap: &str| {
        let out = Command::new("pgrep").args(["-f", &format!("^sleep {nap}")]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    wait_for(Duration::from_secs(20), "the session's processes", || (running(&nap) >= 2).then_some(()));
    console.kill().unwrap();
    console.wait().unwrap();
    // The device notices the console's silence and ends the terminal's whole session.
    wait_for(Duration::from_secs(45), "the session's processes to end", || (running(&nap) == 0).then_some(()));
    let ended = wait_for(Duration::from_secs(10), "the session's record", || {
        obs.messages().into_iter().map(|m| m.json()).find(|v| v["verb"] == "shell" && v["state"] == "failed")
    });
    assert_eq!(ended["error"]["code"], "timeout", "{ended}");

    // Sessions end when the agent stops: its terminal's processes with it, and the console is
    // told (the restarted agent records the operation as interrupted).
    let nap = format!("{}.25", 3000 + rand_u32() % 1000);
    let console = debfleet(&m)
        .args(["shell", "rs-3", "--", &format!("sleep {nap}")])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(20), "the session's process", || (running(&nap) == 1).then_some(()));
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).is_some());
    assert_eq!(running(&nap), 0, "the agent's stop left the session's process running");
    agent.spawn();
    let out = console.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");

    // A device that does not allow them.
    let _plain = Agent::start(AgentSpec { id: "rs-4", port: m.port, groups: &[], extra: "" });
    wait_online(&m, "rs-4");
    let out = debfleet(&m).args(["shell", "rs-4", "--", "true"]).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not_supported") && err.contains("[remote] shell = true"), "{err}");
    let out = debfleet(&m).args(["forward", "rs-4", "0:127.0.0.1:22"]).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not_supported") && err.contains("forward"), "{err}");
}

#[test]
fn forward_reaches_a_service_on_the_device_and_only_the_allowed_one() {
    let m = Mosquitto::start();
    // The device's service: an echo server that shouts back.
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let service_port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in service.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let _agent = remote_agent("rs-5", &m, service_port);
    let local = free_port();
    let mut fwd = debfleet(&m)
        .args(["forward", "rs-5", &format!("{local}:127.0.0.1:{service_port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut conns: Vec<std::net::TcpStream> = (0..3)
        .map(|_| {
            wait_for(Duration::from_secs(20), "the forward's local port", || {
                std::net::TcpStream::connect(("127.0.0.1", local)).ok()
            })
        })
        .collect();
    // Three connections at once, each its own stream; one carries a megabyte.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| b"abcdefghij"[(i % 10) as usize]).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let msg = if i == 1 { big.clone() } else { format!("hello {i}").into_bytes() };
        let reader = {
            let mut c = c.try_clone().unwrap();
            let n = msg.len();
            std::thread::spawn(move || {
                let mut got = vec![0u8; n];
                c.read_exact(&mut got).map(|_| got)
            })
        };
        c.write_all(&msg).unwrap();
        let got = reader.join().unwrap().expect("the echo came back");
        assert_eq!(got, msg.to_ascii_uppercase(), "connection {i}");
    }
    drop(conns);
    unsafe { libc::kill(fwd.id() as i32, libc::SIGINT) };
    let status = fwd.wait().unwrap();
    let mut err = String::new();
    fwd.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    // Another port on the same device is not in its list.
    let out = debfleet(&m).args(["forward", "rs-5", "0:127.0.0.1:1"]).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not in this device's [remote] forward list"), "{err}");
}

/// On a lab device (real systemd, journald): a unit's journal followed live (and nothing left
/// running after), a shell, a forward to a service inside the device, and a killed console's
/// processes ended.
#[test]
fn on_a_lab_device_logs_follow_shell_and_forward() {
    use debfleet_tests::lab::Device;
    use debfleet_tests::repo::RepoServer;
    let m = Mosquitto::start();
    let repo = RepoServer::start(&[]);
    let dev = Device::boot("rm-1");
    let port = free_port();
    let config = format!(
        "broker = \"{}\"\nstate_dir = \"/var/lib/debfleet\"\njournal_any_unit = true\n\n[remote]\nshell = true\nuser = \"root\"\nforward = [\"127.0.0.1:{port}\"]\n",
        m.url()
    );
    dev.install_agent(&config, &repo);
    wait_online(&m, "rm-1");

    // A unit that prints a line every 200 ms, followed from the console.
    dev.ok(&["systemd-run", "--unit=rm-ticker", "sh", "-c", "while true; do echo tick; sleep 0.2; done"]);
    let started = debfleet_protocol::time::now_unix_ms();
    let out = debfleet(&m)
        .args(["logs", "rm-1", "rm-ticker.service", "--lines", "1", "--json", "--follow", "4s"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let entries: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let new: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| {
            e["ts"].as_str().and_then(debfleet_protocol::time::parse_unix_ms).is_some_and(|t| t > started + 1000)
        })
        .collect();
    // Four seconds of a line every 200 ms: new lines kept coming while it followed.
    assert!(new.len() >= 8, "{entries:?}");
    assert!(new.iter().all(|e| e["device"] == "rm-1" && e["message"] == "tick" && e["unit"] == "rm-ticker.service"));
    // Following costs nothing afterwards: no journalctl left on the device.
    wait_for(Duration::from_secs(10), "journalctl to end on the device", || {
        (device_processes(&dev, "journalctl ") == 0).then_some(())
    });

    // A shell on the device.
    let out = debfleet(&m)
        .args(["shell", "rm-1", "--", "systemctl is-active rm-ticker; exit 4"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "active\n");

    // A service inside the device (an echo server by socket activation), reached by a forward.
    dev.ok(&[
        "systemd-run",
        "--unit=rm-echo",
        "systemd-socket-activate",
        "--inetd",
        "--accept",
        &format!("--listen=127.0.0.1:{port}"),
        "cat",
    ]);
    let local = free_port();
    let mut fwd = debfleet(&m)
        .args(["forward", "rm-1", &format!("{local}:127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut conn = wait_for(Duration::from_secs(20), "the forward's local port", || {
        std::net::TcpStream::connect(("127.0.0.1", local)).ok()
    });
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    conn.write_all(b"through the device\n").unwrap();
    let mut got = [0u8; 19];
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"through the device\n");
    drop(conn);
    unsafe { libc::kill(fwd.id() as i32, libc::SIGINT) };
    assert_eq!(fwd.wait().unwrap().code(), Some(0));

    // A console killed mid-session: the device ends the terminal's processes.
    let mut console = debfleet(&m).args(["shell", "rm-1", "--", "sleep 777.5"]).stdin(Stdio::null()).spawn().unwrap();
    wait_for(Duration::from_secs(20), "the remote sleep", || (device_processes(&dev, "sleep 777.5") > 0).then_some(()));
    console.kill().unwrap();
    console.wait().unwrap();
    wait_for(Duration::from_secs(45), "the remote sleep to end", || {
        (device_processes(&dev, "sleep 777.5") == 0).then_some(())
    });
}

/// How many processes in the device have a command line starting with `prefix` (the lab's
/// minimal rootfs has no pgrep).
fn device_processes(dev: &debfleet_tests::lab::Device, prefix: &str) -> usize {
    let script = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done";
    let out = dev.ok(&["sh", "-c", script]);
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

/// A session where nothing moves either way ends at the device's idle timeout (the console's
/// keepalives do not count), and the console says why.
#[test]
fn an_idle_session_ends_at_the_devices_timeout() {
    let m = Mosquitto::start();
    let _agent = remote_agent_idle("rs-6", &m, free_port(), 2);
    let started = Instant::now();
    let out = debfleet(&m).args(["shell", "rs-6", "--", "sleep 60"]).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("idle for 2 s ([remote] idle_timeout_s)"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(50), "the session outlived its idle timeout");
}
