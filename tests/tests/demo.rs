//! `debfleet demo` (issue 5): broker, repository, sample package and lab devices from one
//! command; a package installs through it; SIGTERM takes everything down.

use std::process::{Command, Stdio};
use std::time::Duration;

use debfleet_tests::*;

#[test]
fn demo_runs_a_small_fleet_and_cleans_up() {
    let broker_port = free_port();
    let repo_port = free_port();
    let web_port = free_port();
    let labdir = tempfile::tempdir().unwrap();
    let debs = bin("debfleet").parent().unwrap().parent().unwrap().join("debs");
    let agent = std::fs::read_dir(&debs)
        .expect("target/debs: run scripts/build-debs.sh")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("debfleet-agent_"))
        .unwrap();
    let mut demo = Command::new(bin("debfleet"))
        .args(["demo", "--devices", "2", "--agent-deb"])
        .arg(&agent)
        .args([
            "--broker-listen",
            &format!("127.0.0.1:{broker_port}"),
            "--repo-listen",
            &format!("127.0.0.1:{repo_port}"),
            "--web-listen",
            &format!("127.0.0.1:{web_port}"),
        ])
        .env("DEBFLEET_LAB_DIR", labdir.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(labdir.path().join("demo.stderr")).unwrap())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), "the demo's broker", || {
        if let Ok(Some(status)) = demo.try_wait() {
            let err = std::fs::read_to_string(labdir.path().join("demo.stderr")).unwrap_or_default();
            panic!("the demo exited ({status}) before its broker listened:\n{err}");
        }
        std::net::TcpStream::connect(("127.0.0.1", broker_port)).ok()
    });
    // The tour, as it is printed (the demo keeps running after it).
    let tour = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut out = demo.stdout.take().unwrap();
    let sink = tour.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(&mut out, &mut buf) {
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    // The broker wants a password: the demo prints where its login is before anything else.
    let password_file = wait_for(Duration::from_secs(60), "the demo's broker login", || {
        let t = tour.lock().unwrap();
        let line = t.lines().find(|l| l.starts_with("Broker login: user demo, password file "))?;
        Some(line.trim_start_matches("Broker login: user demo, password file ").trim().to_owned())
    });
    let broker_password = std::fs::read_to_string(&password_file).unwrap().trim().to_owned();
    let observe = |filters: &[&str]| Observer::connect_as(broker_port, "demo", &broker_password, filters);
    let debfleet = || {
        let mut c = Command::new(bin("debfleet"));
        c.env("DEBFLEET_BROKER_USER", "demo").env("DEBFLEET_BROKER_PASSWORD_FILE", &password_file);
        c
    };
    let obs = observe(&["debfleet/device/+/status"]);
    for d in ["lab-1", "lab-2"] {
        obs.wait(&format!("debfleet/device/{d}/status"), Duration::from_secs(120), |v| v["state"] == "online");
    }
    // The web console, with the login the demo printed, shows the fleet.
    let password = wait_for(Duration::from_secs(60), "the web console's login in the tour", || {
        let t = tour.lock().unwrap();
        let line = t.lines().find(|l| l.starts_with(&format!("Web console: http://127.0.0.1:{web_port} ")))?;
        Some(line.split("password ").nth(1)?.trim_end_matches(')').to_owned())
    });
    // The web console reads the fleet from the broker once it starts: the devices show as soon
    // as it has read them (the tour may be printed a moment before).
    wait_for(Duration::from_secs(30), "the web console to list lab-1 and lab-2", || {
        let page = repo::web_page_as(web_port, "demo", &password, "/");
        (page.contains("lab-1") && page.contains("lab-2")).then_some(())
    });
    // The sample package installs on the whole group with one command.
    let broker = format!("mqtt://127.0.0.1:{broker_port}");
    let out = debfleet()
        .args(["install", "--group", "lab", "debfleet-hello=1.0", "--watch", "2", "--json"])
        .env("DEBFLEET_BROKER", &broker)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    // The tour's upgrade to 2.0 comes by delta on every device.
    let out = debfleet()
        .args(["upgrade", "--group", "lab", "debfleet-hello", "--watch", "2", "--json"])
        .env("DEBFLEET_BROKER", &broker)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for o in v.as_array().unwrap() {
        assert_eq!(o["result"]["fetches"][0]["method"], "delta", "{v}");
    }

    // The tour's journal: the sample service's own lines, read on each device.
    let out = debfleet()
        .args(["logs", "--group", "lab", "debfleet-hello.service", "--json"])
        .env("DEBFLEET_BROKER", &broker)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for d in ["lab-1", "lab-2"] {
        assert!(
            v.as_array().unwrap().iter().any(|e| e["device"] == d && e["message"] == "debfleet-hello 2.0 running"),
            "{d}: {v}"
        );
    }
    // Another unit is the device's to allow, not ours.
    let out = debfleet().args(["logs", "lab-1", "ssh.service"]).env("DEBFLEET_BROKER", &broker).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid_value") && err.contains("journal_any_unit"), "{err}");

    // The tour's remote shell: a command run on a lab device over the session topics, its
    // output byte for byte and its exit status ours.
    let out = debfleet()
        .args([
            "shell",
            "lab-1",
            "--",
            "grep device_id /etc/debfleet/agent.toml; systemctl is-active debfleet-hello; exit 3",
        ])
        .env("DEBFLEET_BROKER", &broker)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "device_id = \"lab-1\"\nactive\n");

    // The tour's switch to the cellular profile: the device reconnects with it and reports its
    // link (the embedded broker speaks 3.1.1).
    let out = debfleet()
        .args(["cfg", "set", "lab-2", "profile=cellular", "--json"])
        .env("DEBFLEET_BROKER", &broker)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let link = observe(&["debfleet/device/lab-2/state/link"]);
    let l = link.wait("debfleet/device/lab-2/state/link", Duration::from_secs(60), |v| v["profile"] == "cellular");
    assert_eq!(l["keepalive_s"], 1200, "{l}");
    let show = debfleet().args(["show", "lab-2"]).env("DEBFLEET_BROKER", &broker).output().unwrap();
    assert!(String::from_utf8_lossy(&show.stdout).contains("LINK"), "{}", String::from_utf8_lossy(&show.stdout));

    // The tour's component: the LED strip from the repository, an effect, its frames as a picture.
    let run = |args: &[&str]| {
        let out = debfleet().args(args).env("DEBFLEET_BROKER", &broker).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["install", "lab-1", "debfleet-led-strip", "--watch", "2"]);
    let led = observe(&["debfleet/device/lab-1/state/components"]);
    led.wait("debfleet/device/lab-1/state/components", Duration::from_secs(60), |v| {
        v["components"]["led-strip"]["state"] == "idle"
    });
    run(&["component", "call", "lab-1", "led-strip", "rainbow-cycle", "wait_ms=20"]);
    let drawn = run(&["component", "frames", "lab-1", "led-strip", "--count", "2"]);
    assert!(drawn.contains("\x1b[38;2;") && drawn.contains("the last 2 frames of 60 lights"), "{drawn}");
    let png = labdir.path().join("strip.png");
    run(&["component", "frames", "lab-1", "led-strip", "--count", "32", "--png", png.to_str().unwrap()]);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    // lab-2's (simulated) projector, set up by the demo: a command, acknowledged.
    let on = run(&["component", "call", "lab-2", "projector", "power", "on=true", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&on).unwrap();
    assert_eq!(v[0]["result"]["power"], "on", "{on}");
    assert_eq!(v[0]["result"]["connection"], "connected", "{on}");
    // lab-1's (simulated) robot on ROS 1, set up by the demo: the patrol starts and moves it, the
    // bridge forwards its position, and it stops.
    let robot = observe(&["debfleet/device/lab-1/components/+/stream", "debfleet/device/lab-1/components/robot/state"]);
    let started = run(&["component", "call", "lab-1", "robot", "patrol", "--json"]);
    assert!(started.contains("\"patrolling\""), "{started}");
    robot.wait("debfleet/device/lab-1/components/robot/state", Duration::from_secs(30), |v| {
        v["state"]["pose"]["x"].as_f64().unwrap_or(0.0) > 0.1
    });
    robot.wait("debfleet/device/lab-1/components/ros-bridge/stream", Duration::from_secs(30), |v| {
        v["stream"] == "odom" && v["value"]["pose"]["pose"]["position"]["x"].as_f64().unwrap_or(0.0) > 0.1
    });
    run(&["component", "call", "lab-1", "robot", "stop"]);

    // The tour's desired state: the group's record takes both devices back to 1.0.
    let desired = observe(&["debfleet/device/+/state/desired"]);
    run(&["desired", "set", "--group", "lab", "debfleet-hello=1.0"]);
    for d in ["lab-1", "lab-2"] {
        desired.wait(&format!("debfleet/device/{d}/state/desired"), Duration::from_secs(180), |v| {
            v["state"] == "converged" && v["revisions"]["group/lab"] == 1
        });
    }
    let shown = run(&["desired", "show"]);
    assert!(shown.contains("group/lab") && shown.contains("converged"), "{shown}");

    // The tour's rollout, driven by the controller the demo runs: lab-1, then lab-2, on 2.0.
    let rollouts = observe(&["debfleet/rollout/#"]);
    run(&[
        "rollout",
        "create",
        "--group",
        "lab",
        "--id",
        "hello-2",
        "debfleet-hello=2.0",
        "--waves",
        "1,100%",
        "--watch",
        "5s",
    ]);
    rollouts.wait("debfleet/rollout/hello-2", Duration::from_secs(240), |v| v["phase"] == "succeeded");
    let shown = run(&["rollout", "status", "hello-2"]);
    assert!(shown.contains("succeeded") && shown.contains("healthy"), "{shown}");

    // The tour's install window, hours away on the device's clock (UTC in the lab): lab-1
    // downloads and waits; the operations say who asked.
    let hour = (debfleet_protocol::time::now_unix_ms() / 3_600_000 + 6) % 24;
    let window = format!("{:02}:00-{:02}:00", hour, (hour + 1) % 24);
    run(&["desired", "set", "lab-1", "debfleet-hello=1.0", "--window", &window, "--by", "demo-operator"]);
    desired.wait("debfleet/device/lab-1/state/desired", Duration::from_secs(180), |v| v["state"] == "scheduled");
    let shown = run(&["desired", "show", "lab-1"]);
    assert!(shown.contains("scheduled") && shown.contains(&window), "{shown}");
    let ops = run(&["ops", "lab-1"]);
    assert!(ops.contains("BY") && ops.contains("demo-operator") && ops.contains("rollout/hello-2"), "{ops}");

    // Auth is on: without the demo's login the broker lets nobody in; each device has its own.
    let out = Command::new(bin("debfleet")).args(["devices"]).env("DEBFLEET_BROKER", &broker).output().unwrap();
    assert!(!out.status.success(), "an anonymous console read the fleet");
    let listed =
        run(&["broker", "list", "--dir", std::path::Path::new(&password_file).parent().unwrap().to_str().unwrap()]);
    assert!(listed.contains("lab-1\tdevice\tgroups lab") && listed.contains("demo\tadmin"), "{listed}");

    // SIGTERM: devices and services go away.
    Command::new("kill").arg("-TERM").arg(demo.id().to_string()).status().unwrap();
    let status = wait_for(Duration::from_secs(60), "the demo to stop", || demo.try_wait().unwrap());
    assert!(status.success());
    assert_eq!(std::fs::read_dir(labdir.path().join("devices")).map(|d| d.count()).unwrap_or(0), 0);
    assert!(std::net::TcpStream::connect(("127.0.0.1", repo_port)).is_err(), "repository stopped");
    assert!(tour.lock().unwrap().contains("debfleet component call lab-1 robot patrol"), "the tour shows the robot");
    assert!(tour.lock().unwrap().contains("debfleet monitor"), "the tour shows the monitor");

    // The tour's lines work when pasted into another terminal: the binaries go on the PATH.
    let tour = tour.lock().unwrap().clone();
    let dir = bin("debfleet").parent().unwrap().display().to_string();
    assert!(tour.contains(&format!("export PATH={dir}:$PATH")), "{tour}");
    assert!(
        tour.contains(&format!("export DEBFLEET_BROKER_USER=demo DEBFLEET_BROKER_PASSWORD_FILE={password_file}")),
        "{tour}"
    );
}

fn agent_deb() -> std::path::PathBuf {
    own_deb("debfleet-agent")
}

#[test]
fn a_busy_port_is_named_at_once_and_a_killed_demo_frees_its_ports() {
    let labdir = tempfile::tempdir().unwrap();
    let demo = |broker: u16, repo: u16| {
        let mut c = Command::new(bin("debfleet"));
        c.args(["demo", "--devices", "1", "--agent-deb"])
            .arg(agent_deb())
            .args(["--broker-listen", &format!("127.0.0.1:{broker}"), "--repo-listen", &format!("127.0.0.1:{repo}")])
            .env("DEBFLEET_LAB_DIR", labdir.path());
        c
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let out = demo(free_port(), busy).stdout(Stdio::null()).stderr(Stdio::piped()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{busy} is not free")), "{err}");
    drop(taken);

    // Killed with SIGKILL once its repository server runs: the server goes with it.
    let (broker_port, repo_port) = (free_port(), free_port());
    let mut child = demo(broker_port, repo_port).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for(Duration::from_secs(60), "the demo's repository", || {
        std::net::TcpStream::connect(("127.0.0.1", repo_port)).ok()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(Duration::from_secs(10), "the repository port to be free", || {
        std::net::TcpListener::bind(("127.0.0.1", repo_port)).ok()
    });
    // Its devices outlive it by design (like `debfleet lab up`); the lab takes them down.
    let out =
        Command::new(bin("debfleet")).args(["lab", "down"]).env("DEBFLEET_LAB_DIR", labdir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
