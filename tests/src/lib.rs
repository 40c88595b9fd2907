//! Test harness for end-to-end tests: a real Mosquitto on a free loopback port, the real agent
//! and console binaries, an MQTT observer, and a TCP proxy that can partition a connection.
//!
//! The binaries are the workspace's own build (`target/debug`); the README's test command
//! builds them before the tests run.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod browser;
pub mod lab;
pub mod netem;
pub mod repo;
pub mod ros;
pub mod terminal;

/// Where cargo put the workspace binaries: next to the test executable's `deps/` folder.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the workspace binaries first (cargo build --bins)", path.display());
    path
}

/// A child process killed (and reaped) however the test ends.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_port(port: u16) {
    wait_for(Duration::from_secs(10), "a listening port", || TcpStream::connect(("127.0.0.1", port)).ok());
}

/// A real Mosquitto on a free loopback port, stopped on drop.
pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// More listener options (TLS).
    extra: String,
    /// Lines that replace the open test settings (anonymous clients allowed) — a secured broker.
    secured: Option<String>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mosquitto { port, dir, child: None, extra: String::new(), secured: None };
        m.spawn();
        m
    }

    /// A Mosquitto configured with `lines` (passwords, ACLs) and no anonymous access.
    pub fn start_secured(lines: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let mut m =
            Mosquitto { port: free_port(), dir, child: None, extra: String::new(), secured: Some(lines.into()) };
        m.spawn();
        m
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// A Mosquitto that only speaks TLS, with a fresh CA; returns it and the CA file.
    pub fn start_tls() -> (Mosquitto, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_test_pki(dir.path());
        let d = dir.path().display().to_string();
        let extra = format!("cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n");
        let mut m = Mosquitto { port: free_port(), dir, child: None, extra, secured: None };
        m.spawn();
        (m, ca)
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let listeners = format!("listener {} 127.0.0.1\n{}", self.port, self.extra);
        let text = match &self.secured {
            Some(lines) => mosquitto_conf(&listeners).replace("allow_anonymous true\n", "") + lines + "log_type all\n",
            None => mosquitto_conf(&listeners),
        };
        std::fs::write(&conf, text).unwrap();
        let exe = mosquitto_exe();
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new(exe).arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
        wait_port(self.port);
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts again on the same port (retained state is not persisted: the agent
    /// has to republish everything).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

/// A test broker's configuration with these listener lines. Run as root, Mosquitto would switch
/// to its own user, which cannot read our temporary files; as any other user the line is
/// ignored. The packet cap is the one we document for production brokers: below what our clients
/// accept. The queue per client is raised from 1000 so an observer of a burst of results is not
/// what loses them.
pub fn mosquitto_conf(listeners: &str) -> String {
    format!(
        "{listeners}allow_anonymous true\npersistence false\nuser root\nmax_packet_size {}\nmax_queued_messages 10000\nset_tcp_nodelay true\n",
        debfleet_protocol::limits::BROKER_MAX_PACKET_BYTES
    )
}

pub fn mosquitto_exe() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"].into_iter().find(|p| Path::new(p).exists()).expect(
        "mosquitto is not installed: run the README's test command (it installs it) or apt-get install mosquitto",
    )
}

/// `debfleet serve` (the embedded broker, MQTT 3.1.1) on `port`, once it listens; without the
/// web console.
pub fn embedded_broker(port: u16) -> Child {
    embedded_broker_with(port, &["--no-web"])
}

/// `debfleet serve` on `port` with more arguments, once the broker listens.
pub fn embedded_broker_with(port: u16, args: &[&str]) -> Child {
    let child = Command::new(bin("debfleet"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(20), "the embedded broker", || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    child
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with the openssl tool.
fn make_test_pki(dir: &Path) -> PathBuf {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=debfleet test CA"],
    ]
    .concat());
    run(&[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]].concat());
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    dir.join("ca.pem")
}

/// A running `debfleet-agent` with its own state directory.
pub struct Agent {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
}

pub struct AgentSpec<'a> {
    pub id: &'a str,
    pub port: u16,
    pub groups: &'a [&'a str],
    /// More TOML appended to the configuration.
    pub extra: &'a str,
}

impl Agent {
    /// Starts an agent with extra environment (test hooks such as a slow disk).
    pub fn start_with_env(spec: AgentSpec, env: &[(&str, &str)]) -> Agent {
        let saved: Vec<(String, Option<std::ffi::OsString>)> =
            env.iter().map(|(k, _)| ((*k).to_owned(), std::env::var_os(k))).collect();
        // The child inherits these; set only around the spawn.
        let _guard = ENV_LOCK.lock().unwrap();
        for (k, v) in env {
            std::env::set_var(k, v);
        }
        let a = Agent::start(spec);
        for (k, v) in saved {
            match v {
                Some(v) => std::env::set_var(&k, v),
                None => std::env::remove_var(&k),
            }
        }
        a
    }
}

static ENV_LOCK: Mutex<()> = Mutex::new(());

impl Agent {
    pub fn start(spec: AgentSpec) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let groups: Vec<String> = spec.groups.iter().map(|g| format!("{g:?}")).collect();
        // Top-level keys of `extra` (those before its first table) go before the tables here.
        let (top, tables) = match spec.extra.find("\n[").map(|i| i + 1).or(spec.extra.starts_with('[').then_some(0)) {
            Some(i) => spec.extra.split_at(i),
            None => (spec.extra, ""),
        };
        // Each test agent's components' socket in its own directory (agents before components
        // — the wire benchmark's baseline — refuse the key).
        let socket = if spec.extra.contains("components_socket") || std::env::var_os("DEBFLEET_AGENT_LEGACY").is_some()
        {
            String::new()
        } else {
            format!("components_socket = {:?}\n", dir.path().join("agent.sock"))
        };
        let text = format!(
            "device_id = {:?}\nbroker = \"mqtt://127.0.0.1:{}\"\nstate_dir = {:?}\ngroups = [{}]\n{socket}{top}\n\n[reconnect]\ninitial_delay_ms = 100\nmax_delay_s = 1\n\n{tables}\n",
            spec.id,
            spec.port,
            dir.path().join("state"),
            groups.join(", "),
        );
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, text).unwrap();
        let mut a = Agent { id: spec.id.to_owned(), dir, config, child: None };
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log")).unwrap();
        // Benchmarks point this at the binary users get (the size-optimised `agent` profile).
        let exe = std::env::var_os("DEBFLEET_AGENT_BIN").map(PathBuf::from).unwrap_or_else(|| bin("debfleet-agent"));
        let child = Command::new(exe)
            .arg("--config")
            .arg(&self.config)
            .env_remove("INVOCATION_ID")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Where its components connect.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit and returns its status code (None: killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let status = wait_for(timeout, "the agent to exit", || child.try_wait().unwrap());
        self.child = None;
        status.code()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the console binary against a broker.
pub fn console(broker: &str, args: &[&str]) -> Output {
    Command::new(bin("debfleet")).args(args).env("DEBFLEET_BROKER", broker).output().unwrap()
}

/// Runs the console binary: its exit code, its stdout as JSON (`Null` when it is not), and all it
/// printed (for assertion messages).
pub fn console_result(broker: &str, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = console(broker, args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), serde_json::from_slice(&out.stdout).unwrap_or(Value::Null), text)
}

pub fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
}

/// An MQTT client in the test: subscribes, records everything, publishes.
pub struct Observer {
    client: rumqttc::Client,
    msgs: Arc<Mutex<Vec<Msg>>>,
    _thread: thread::JoinHandle<()>,
}

impl Observer {
    pub fn connect(port: u16, filters: &[&str]) -> Observer {
        Self::connect_to("127.0.0.1", port, filters)
    }

    pub fn connect_to(host: &str, port: u16, filters: &[&str]) -> Observer {
        Self::connect_with(host, port, None, filters)
    }

    /// As a broker user.
    pub fn connect_as(port: u16, user: &str, password: &str, filters: &[&str]) -> Observer {
        Self::connect_with("127.0.0.1", port, Some((user, password)), filters)
    }

    fn connect_with(host: &str, port: u16, login: Option<(&str, &str)>, filters: &[&str]) -> Observer {
        let mut opts = rumqttc::MqttOptions::new(format!("test-{:08x}", rand_u32()), host, port);
        if let Some((user, password)) = login {
            opts.set_credentials(user, password);
        }
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = rumqttc::Client::new(opts, 256);
        for f in filters {
            client.subscribe(*f, rumqttc::QoS::AtLeastOnce).unwrap();
        }
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let sink = msgs.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let expected = filters.len();
        let thread = thread::spawn(move || {
            let mut subacks = 0;
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => sink.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        subacks += 1;
                        if subacks == expected {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) if expected == 0 => {
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("observer subscribed");
        Observer { client, msgs, _thread: thread }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.into()).unwrap();
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.msgs.lock().unwrap().clear();
    }

    /// The first recorded message on `topic` satisfying `pred`, waiting for it.
    pub fn wait(&self, topic: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        wait_for(timeout, &format!("a matching message on {topic}"), || {
            self.messages().into_iter().find(|m| m.topic == topic && pred(&m.json())).map(|m| m.json())
        })
    }

    /// The latest recorded message on `topic`, if any.
    pub fn last(&self, topic: &str) -> Option<Msg> {
        self.messages().into_iter().rev().find(|m| m.topic == topic)
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    t ^ std::process::id().rotate_left(16)
}

/// A TCP proxy between agents and a broker that the test can partition: stop forwarding what
/// clients send (their publishes vanish while they still believe they are connected), and cut
/// every connection.
pub struct Proxy {
    pub port: u16,
    stall_upstream: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stall = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (stall2, conns2) = (stall.clone(), conns.clone());
        accept_pairs(listener, upstream, move |client, server| {
            conns2.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let stall = stall2.clone();
            thread::spawn(move || pipe(client, server, Some(stall)));
            thread::spawn(move || pipe(s2, c2, None));
        });
        Proxy { port, stall_upstream: stall, conns }
    }

    pub fn stall_upstream(&self, on: bool) {
        self.stall_upstream.store(on, Ordering::SeqCst);
    }

    pub fn cut_all(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Accepts clients on `listener` and, for each, connects to `upstream` and hands the pair on.
fn accept_pairs(listener: TcpListener, upstream: u16, mut each: impl FnMut(TcpStream, TcpStream) + Send + 'static) {
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            };
            each(client, server);
        }
    });
}

/// The .deb of one of our own packages that scripts/build-debs.sh made (target/debs).
pub fn own_deb(name: &str) -> PathBuf {
    let dir = bin("debfleet").parent().and_then(Path::parent).expect("target dir").join("debs");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-debs.sh first", dir.display()))
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{name}_")))
        .unwrap_or_else(|| panic!("no {name} .deb in {}; run scripts/build-debs.sh", dir.display()))
}

fn pipe(mut from: TcpStream, mut to: TcpStream, stall: Option<Arc<AtomicBool>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stall.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
            continue; // swallowed: the sender thinks it went out
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// A TCP proxy in front of a broker that behaves like a clustered broker's retained dispatcher:
/// PUBLISH packets carrying the retain flag (retained deliveries) reach the client `delay` late,
/// everything else at once — so a marker published after SUBSCRIBE overtakes them, as EMQX's
/// separate, rate-limited retainer worker allows.
pub struct RetainDelayProxy {
    pub port: u16,
    delaying: Arc<AtomicBool>,
}

impl RetainDelayProxy {
    pub fn start(upstream: u16, delay: Duration) -> RetainDelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let delaying = Arc::new(AtomicBool::new(true));
        let on = delaying.clone();
        accept_pairs(listener, upstream, move |client, server| {
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || pipe(client, server, None));
            let on = on.clone();
            thread::spawn(move || delay_retained(s2, c2, delay, on));
        });
        RetainDelayProxy { port, delaying }
    }

    /// Whether new connections' retained deliveries are held back.
    pub fn delaying(&self, on: bool) {
        self.delaying.store(on, Ordering::SeqCst);
    }
}

/// Reads MQTT packets from `from` and writes them to `to`, holding back retained PUBLISHes.
fn delay_retained(mut from: TcpStream, to: TcpStream, delay: Duration, on: Arc<AtomicBool>) {
    let delay = if on.load(Ordering::SeqCst) { delay } else { Duration::ZERO };
    let to = Arc::new(Mutex::new(to));
    let (held_tx, held_rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let sink = to.clone();
    thread::spawn(move || {
        for (due, packet) in held_rx {
            let wait = due.saturating_duration_since(Instant::now());
            thread::sleep(wait);
            if sink.lock().unwrap().write_all(&packet).is_err() {
                return;
            }
        }
    });
    loop {
        // Fixed header: type and flags, then the remaining length (variable-length integer).
        let mut first = [0u8; 1];
        if from.read_exact(&mut first).is_err() {
            break;
        }
        let mut header = vec![first[0]];
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            if from.read_exact(&mut b).is_err() {
                return;
            }
            header.push(b[0]);
            len |= ((b[0] & 0x7f) as usize) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        if from.read_exact(&mut body).is_err() {
            break;
        }
        header.extend_from_slice(&body);
        let retained_publish = first[0] >> 4 == 3 && first[0] & 1 == 1;
        if retained_publish && !delay.is_zero() {
            let _ = held_tx.send((Instant::now() + delay, header));
        } else if to.lock().unwrap().write_all(&header).is_err() {
            break;
        }
    }
    let _ = to.lock().unwrap().shutdown(Shutdown::Both);
}

/// Starts `apt-get install PKG` inside a device and returns once that package's preinst runs:
/// from then on, another apt holds the dpkg lock (until the preinst ends).
pub fn hold_dpkg_lock(dev: &lab::Device, package: &str) -> Child {
    let holder = Command::new("nsenter")
        .args([
            "-t",
            &dev.pid.to_string(),
            "-a",
            "--",
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            package,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(30), "the other apt to hold the lock", || {
        // The device's processes are visible from the host (its PID namespace is nested).
        Command::new("pgrep").args(["-f", "tmp.ci/preinst"]).output().unwrap().status.success().then_some(())
    });
    holder
}
