//! `debfleet demo`: everything on one machine — the embedded broker, a repository server with
//! the agent and a sample package in two versions, and lab devices running the agent — then a
//! short guided tour. Ctrl-C takes it all down again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use debfleet_lab::Lab;

use crate::repo::RepoClient;
use crate::Ctx;

pub struct DemoArgs {
    pub devices: u32,
    pub agent_deb: Option<PathBuf>,
    pub broker_listen: SocketAddr,
    pub repo_listen: SocketAddr,
    pub web_listen: SocketAddr,
}

/// The debfleet-repo binary: beside this one, else on PATH.
fn repo_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("debfleet-repo")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "debfleet-repo".into())
}

fn find_agent_deb(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let dir = Path::new("target/debs");
    let found = std::fs::read_dir(dir).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("debfleet-agent_")))
    });
    found.context("no agent package: build it with scripts/build-debs.sh (target/debs) or pass --agent-deb FILE")
}

/// A sample component: a service that says hello with its version, with a data file that
/// changes a little between versions (as real updates do), so that its upgrade goes by delta.
fn sample_package(dir: &Path, version: &str) -> Result<PathBuf> {
    let d = dir.join(format!("hello-{version}"));
    std::fs::create_dir_all(&d)?;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut data: Vec<u8> = (0..192 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    data.extend_from_slice(format!("debfleet-hello {version}\n").as_bytes());
    std::fs::write(d.join("data"), data)?;
    std::fs::write(
        d.join("debfleet-hello"),
        format!("#!/bin/sh\necho \"debfleet-hello {version} running\"\nexec sleep infinity\n"),
    )?;
    std::fs::write(
        d.join("debfleet-hello.service"),
        "[Unit]\nDescription=debfleet sample service\n\n[Service]\nExecStart=/usr/bin/debfleet-hello\nRestart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n",
    )?;
    std::fs::write(
        d.join("manifest.toml"),
        format!(
            "[package]\nname = \"debfleet-hello\"\nversion = \"{version}\"\narchitecture = \"all\"\nmaintainer = \"debfleet demo <demo@example.com>\"\ndescription = \"debfleet sample service\"\n\n[[files]]\nsource = \"debfleet-hello\"\ndest = \"/usr/bin/debfleet-hello\"\nmode = \"0755\"\n\n[[files]]\nsource = \"data\"\ndest = \"/usr/share/debfleet-hello/data\"\n\n[[units]]\nsource = \"debfleet-hello.service\"\n"
        ),
    )?;
    let manifest = d.join("manifest.toml");
    let m = debfleet_packaging::load(&manifest)?;
    let opts = debfleet_packaging::BuildOptions {
        version: None,
        architecture: None,
        source_date_epoch: 1_790_000_000,
        out_dir: dir.to_owned(),
    };
    Ok(debfleet_packaging::build(&m, &manifest, &opts)?)
}

/// A package beside `deb` whose file name starts with `prefix`.
fn sibling_deb(deb: &Path, prefix: &str) -> Option<PathBuf> {
    let dir = deb.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
}

/// Where the simulated projector's serial line appears on its device.
const SIM_TTY: &str = "/run/projector-sim.tty";

/// Gives a device "a projector on its serial port": the projector component installed through
/// debfleet like any package, a simulated Optoma projector on a pseudo-terminal beside it (the
/// lab has no serial ports; a drop-in allows ptys), and the component pointed at it.
/// A child that gets SIGTERM when the demo goes, even when the demo is killed with SIGKILL (the
/// repository server would otherwise keep its port, and the next demo would find it taken).
fn dies_with_demo(mut cmd: Command) -> Command {
    // SAFETY: prctl in the child between fork and exec, async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// One command to one device, waited for.
fn command(ctx: &Ctx, name: &str, args: debfleet_protocol::CommandArgs) -> Result<()> {
    let id = debfleet_protocol::DeviceId::new(name)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let (mut session, mut fleet) = crate::cmds::load_fleet(ctx).await?;
        let req = crate::request::Request {
            target: crate::request::Target::Devices(vec![id]),
            args,
            timeout: Duration::from_secs(300),
            expires: None,
            by: ctx.by.clone(),
        };
        let outcomes = crate::request::send_and_wait(&mut session, &ctx.topics, &mut fleet, &req).await?;
        session.disconnect().await;
        match outcomes.first() {
            Some(o) if o.ok => Ok(()),
            Some(o) => bail!("{name}: {}", o.error.clone().unwrap_or_default()),
            None => bail!("{name}: no answer"),
        }
    })
}

/// A component call, retried for a while: the component may still be connecting to its agent.
fn call_component(ctx: &Ctx, name: &str, component: &str, action: &str, args: serde_json::Value) -> Result<()> {
    let serde_json::Value::Object(args) = args else { bail!("arguments must be an object") };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let a = debfleet_protocol::CommandArgs::Call {
            component: component.parse()?,
            action: action.parse()?,
            args: args.clone(),
        };
        match command(ctx, name, a) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// A ROS 1 master for the robot on this machine (the lab's devices share its network), when
/// Debian's rosmaster is installed (scripts/run.sh installs it).
fn start_rosmaster(work: &Path) -> Result<Option<(Child, String)>> {
    if !Path::new("/usr/bin/rosmaster").exists() {
        eprintln!("demo: no rosmaster (apt-get install python3-rosmaster): no robot in this demo");
        return Ok(None);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = dies_with_demo(Command::new("/usr/bin/rosmaster"))
        .args(["--core", "-p", &port.to_string()])
        .env("ROS_HOME", work.join("ros"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("rosmaster.log"))?)
        .spawn()
        .context("starting rosmaster")?;
    Ok(Some((child, format!("http://127.0.0.1:{port}/"))))
}

/// Gives a device a (simulated) robot: the simulated base, the patrol sample and the ROS
/// bridge installed through debfleet like any package, pointed at the demo's ROS master; the
/// bridge forwards the robot's position once a second and may drive it on /cmd_vel.
fn attach_robot(ctx: &Ctx, lab: &Lab, name: &str, master: &str) -> Result<()> {
    use debfleet_protocol::{CommandArgs, PackageOptions, PackageSpec};
    eprintln!("demo: giving {name} a (simulated) robot on ROS 1...");
    let packages = ["debfleet-sim-robot", "debfleet-robot-sample", "debfleet-ros-bridge"]
        .map(|p| PackageSpec { name: p.into(), version: None })
        .to_vec();
    command(ctx, name, CommandArgs::Install { packages, options: PackageOptions::default() })?;
    let dev = lab.attach(name)?;
    dev.write("/etc/default/debfleet-ros", &format!("ROS_MASTER_URI={master}\nROS_HOSTNAME=127.0.0.1\n"))?;
    dev.ok(&["systemctl", "restart", "debfleet-sim-robot", "debfleet-robot-sample", "debfleet-ros-bridge"])?;
    let cfg = serde_json::json!({
        "subscriptions": {"odom": {"topic": "/odom", "max_rate_hz": 1, "fields": ["pose.pose.position"]}},
        "publishers": {"cmd_vel": {"topic": "/cmd_vel", "type": "geometry_msgs/Twist"}},
    });
    call_component(ctx, name, "ros-bridge", "cfg", cfg)
}

fn attach_projector(ctx: &Ctx, lab: &Lab, name: &str) -> Result<()> {
    use debfleet_protocol::{CommandArgs, PackageOptions, PackageSpec};
    eprintln!("demo: attaching a (simulated) projector to {name}...");
    let call = |args: CommandArgs| command(ctx, name, args);
    let package = PackageSpec { name: "debfleet-projector".into(), version: None };
    call(CommandArgs::Install { packages: vec![package], options: PackageOptions::default() })?;
    let dev = lab.attach(name)?;
    dev.ok(&["mkdir", "-p", "/etc/systemd/system/debfleet-projector.service.d"])?;
    dev.write(
        "/etc/systemd/system/debfleet-projector.service.d/demo-pty.conf",
        "[Service]\nDeviceAllow=char-pts rw\n",
    )?;
    dev.ok(&["systemctl", "daemon-reload"])?;
    dev.ok(&["systemd-run", "--unit=projector-sim", "/usr/bin/debfleet-projector", "--simulate", SIM_TTY])?;
    dev.ok(&["systemctl", "restart", "debfleet-projector"])?;
    call_component(ctx, name, "projector", "cfg", serde_json::json!({"port": SIM_TTY}))
}

struct Services {
    repo: Option<Child>,
    ros: Option<Child>,
    lab: Lab,
}

impl Drop for Services {
    fn drop(&mut self) {
        let gone = self.lab.down();
        if !gone.is_empty() {
            eprintln!("demo: stopped {}", gone.join(", "));
        }
        for mut c in [self.repo.take(), self.ros.take()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(ctx: &Ctx, args: DemoArgs) -> Result<u8> {
    if args.devices == 0 || args.devices > 16 {
        bail!(crate::cmds::UsageError("--devices must be between 1 and 16".into()));
    }
    let agent_deb = find_agent_deb(args.agent_deb)?;
    debfleet_lab::ensure_host_packages()?;
    // Both ports first, so a busy one is named at once (a demo killed earlier, another broker)
    // rather than found half-way.
    for (what, addr) in [
        ("the broker", args.broker_listen),
        ("the repository server", args.repo_listen),
        ("the web console", args.web_listen),
    ] {
        if let Err(e) = std::net::TcpListener::bind(addr) {
            bail!(
                "{addr} is not free for {what} ({e}): another broker or an earlier demo may hold it \
                 (`ss -ltnp 'sport = :{}'` shows which); stop it or pass --broker-listen/--repo-listen/--web-listen",
                addr.port()
            );
        }
    }
    let broker_url = format!("mqtt://{}", args.broker_listen);
    let repo_url = format!("http://{}", args.repo_listen);
    let work = std::env::temp_dir().join(format!("debfleet-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    // The broker, in this process, with passwords on (debfleet broker): the devices get their
    // own when they are enrolled below, this console and the tour sign in as `demo`.
    let broker_dir = work.join("broker");
    let demo_password_file = broker_dir.join("demo.password");
    let demo_password = {
        let mut b = crate::broker::BrokerDir::init(&broker_dir, ctx.topics.prefix())?;
        let p = b.add_user("demo", debfleet_protocol::Role::Admin, None)?.context("a new password")?;
        crate::broker::write_private(&demo_password_file, format!("{p}\n").as_bytes(), false)?;
        p
    };
    let ctx = Ctx {
        broker: broker_url.clone(),
        ca_file: None,
        topics: ctx.topics.clone(),
        expires: ctx.expires,
        by: ctx.by.clone(),
        credentials: Some(("demo".to_owned(), demo_password)),
        signer: ctx.signer.clone(),
    };
    std::net::TcpListener::bind(args.broker_listen)
        .with_context(|| format!("cannot listen on {}", args.broker_listen))?;
    let listen = args.broker_listen;
    let dir = broker_dir.clone();
    std::thread::spawn(move || {
        if let Err(e) = crate::serve::run(listen, None, false, None, Some(&dir)) {
            eprintln!("demo: the embedded broker stopped: {e:#}");
        }
    });
    // Printed first, for whoever connects before the tour is out (tests, watchers).
    println!("Broker login: user demo, password file {}", demo_password_file.display());

    // The repository: a fresh one for the demo.
    let root = work.join("repo");
    let init = Command::new(repo_binary())
        .args(["init", "--root"])
        .arg(&root)
        .output()
        .context("running debfleet-repo init")?;
    if !init.status.success() {
        bail!("debfleet-repo init: {}", String::from_utf8_lossy(&init.stderr));
    }
    let token = String::from_utf8_lossy(&init.stdout).lines().last().unwrap_or_default().trim().to_owned();
    let repo = dies_with_demo(Command::new(repo_binary()))
        .args(["serve", "--root"])
        .arg(&root)
        .args(["--listen", &args.repo_listen.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("repo.log"))?)
        .spawn()
        .context("starting debfleet-repo")?;
    let mut services = Services { repo: Some(repo), ros: None, lab: Lab::open() };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(args.repo_listen).is_err() {
        if std::time::Instant::now() > deadline {
            bail!("the repository server did not start (see {})", work.join("repo.log").display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = RepoClient::new(Some(crate::repo::RepoAccess {
        url: repo_url.clone(),
        token: Some(token.clone()),
        insecure: false,
    }))?;
    client.upload(&agent_deb, "stable")?;
    for v in ["1.0", "2.0"] {
        client.upload(&sample_package(&work, v)?, "stable")?;
    }
    // The LED-strip component, built beside the agent's package (scripts/build-debs.sh).
    let led = sibling_deb(&agent_deb, "debfleet-led-strip_")
        .context("no debfleet-led-strip package beside the agent's: build both with scripts/build-debs.sh")?;
    client.upload(&led, "stable")?;
    let projector = sibling_deb(&agent_deb, "debfleet-projector_")
        .context("no debfleet-projector package beside the agent's: build both with scripts/build-debs.sh")?;
    client.upload(&projector, "stable")?;
    for p in ["debfleet-ros-bridge_", "debfleet-robot-sample_", "debfleet-sim-robot_"] {
        let deb = sibling_deb(&agent_deb, p)
            .with_context(|| format!("no {p}*.deb beside the agent's: build them with scripts/build-debs.sh"))?;
        client.upload(&deb, "stable")?;
    }
    eprintln!(
        "demo: repository at {repo_url} with debfleet-agent, the components (LED strip, projector, ROS bridge, robot sample) and debfleet-hello 1.0, 2.0"
    );

    // The devices, taking the agent from the repository like a real fleet would.
    let key = root.join("public/debfleet-archive-keyring.gpg");
    for i in 1..=args.devices {
        let name = format!("lab-{i}");
        eprintln!("demo: booting {name}...");
        let dev = match services.lab.attach(&name) {
            Ok(d) => d,
            Err(_) => services.lab.create(&name)?,
        };
        let from = crate::lab::Source { agent_deb: None, repo: Some(&repo_url), key: Some(&key) };
        // The demo's devices allow a remote shell (the tour opens one).
        crate::lab::provision(&dev, &ctx, &from, "lab", Some((&broker_dir, "lab")), true)?;
    }
    let projector_on = (args.devices >= 2).then(|| "lab-2".to_owned());
    if let Some(name) = &projector_on {
        attach_projector(&ctx, &services.lab, name)?;
    }
    let robot_on = match start_rosmaster(&work)? {
        Some((child, uri)) => {
            services.ros = Some(child);
            attach_robot(&ctx, &services.lab, "lab-1", &uri)?;
            Some("lab-1")
        }
        None => None,
    };
    // The web console, signed in to as `demo` with a password made now (kept in the demo's
    // directory with its audit log, both gone with it).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let password = debfleet_web::session::token()[..16].to_owned();
    let web_opts = crate::web::WebOptions {
        listen: args.web_listen,
        repo: Some(crate::repo::RepoAccess { url: repo_url.clone(), token: Some(token.clone()), insecure: false }),
        tls: None,
        users: work.join("web-users"),
        audit: work.join("audit.log"),
    };
    debfleet_web::users::Users::load(&web_opts.users)?.add("demo", debfleet_protocol::Role::Admin, &password)?;
    let web = rt.block_on(crate::web::Server::start(&ctx, &web_opts))?;
    let web_url = web.url();
    // The lines below are meant to be pasted: this binary's directory goes on the PATH.
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.display().to_string()))
        .unwrap_or_else(|| ".".into());
    println!(
        "\ndebfleet demo is running: broker {broker_url}, repository {repo_url}, devices lab-1..lab-{n}.\n\
         Web console: {web_url} (sign in as demo, password {password})\n\
         In another terminal:\n\
         \x20 export PATH={bin_dir}:$PATH DEBFLEET_BROKER={broker_url} DEBFLEET_REPO={repo_url} DEBFLEET_TOKEN={token}\n\
         \x20 export DEBFLEET_BROKER_USER=demo DEBFLEET_BROKER_PASSWORD_FILE={password_file}   # the broker wants a password\n\
         \x20 debfleet devices                                  # the fleet, from retained topics\n\
         \x20 debfleet install --group lab debfleet-hello=1.0   # one publish, every device installs\n\
         \x20 debfleet upgrade --group lab debfleet-hello       # to 2.0 by delta (FETCHED, SAVED), units verified\n\
         \x20 debfleet show lab-1                               # ... and what its transfers cost (TRANSFER)\n\
         \x20 debfleet rollback lab-1 debfleet-hello            # back to 1.0\n\
         \x20 debfleet desired set --group lab debfleet-hello=1.0   # desired state: lab-2 goes back too, and a\n\
         \x20 debfleet desired show                             # device away meanwhile would on its return\n\
         \x20 debfleet rollout create --group lab --id hello-2 debfleet-hello=2.0 --waves 1,100% --watch 10s\n\
         \x20 debfleet rollout status hello-2                   # staged: lab-1 first, the rest once it stayed healthy\n\
         \x20 debfleet desired set lab-1 debfleet-hello=1.0 --window 02:00-04:00   # at night, device time: downloads now\n\
         \x20 debfleet desired show lab-1                       # scheduled, and when its window opens\n\
         \x20 debfleet ops lab-1                                # every operation, and who asked (BY)\n\
         \x20 debfleet logs lab-1 debfleet-hello.service       # the unit's journal, read on the device (no SSH)\n\
         \x20 debfleet shell lab-1                              # a terminal on the device over MQTT (~. ends it)\n\
         \x20 debfleet shell lab-1 -- systemctl status debfleet-hello   # one command; its exit status is ours\n\
         \x20 debfleet broker list --dir {broker_dir}   # who may connect: each device its own password, and demo\n\
         \x20 DEBFLEET_BROKER_USER=eve debfleet devices         # refused: the broker knows no eve\n\
         \x20 echo ana-password | debfleet web user add ana --role viewer --users {users}\n\
         \x20     # ana can sign in to the web console now, and look but not act (a viewer)\n\
         \x20 debfleet audit verify {audit}   # what was done in the web console, hash-chained\n\
         \x20 debfleet cfg set lab-2 profile=cellular          # metered link: long keepalive, kept session, a budget\n\
         \x20 debfleet show lab-2                               # LINK: today's bytes by class against the budget\n\
         \x20 debfleet install lab-1 debfleet-led-strip         # a component: its own .deb and unit (a virtual strip here)\n\
         \x20 debfleet component call lab-1 led-strip rainbow-cycle wait_ms=20\n\
         \x20 debfleet component frames lab-1 led-strip         # what the strip shows, frame by frame\n\
         \x20 debfleet component cfg lab-1 led-strip brightness=30\n\
         \x20 debfleet component show lab-1 led-strip           # its actions, state, metrics, configuration\n\
{projector}{robot}\x20 debfleet watch --group lab                        # status, progress, logs, telemetry\n\
         \x20 debfleet monitor                                  # the fleet live in a terminal: arrows, g for groups, q\n\
         \x20 debfleet lab kill lab-2 && debfleet devices      # lost, dated by when it was last heard\n\
         \x20 debfleet lab boot lab-2                          # and back\n\
         \x20 source <(debfleet completions bash)              # tab completion\n\
         Ctrl-C stops the demo and removes its devices.",
        n = args.devices,
        password_file = demo_password_file.display(),
        broker_dir = broker_dir.display(),
        users = web_opts.users.display(),
        audit = web_opts.audit.display(),
        projector = match &projector_on {
            Some(d) => format!(
                "\x20 debfleet component call {d} projector power on=true   # {d}'s (simulated) projector: acknowledged\n\
                 \x20 debfleet component call {d} projector input source=hdmi2\n\
                 \x20 debfleet component show {d} projector              # what the projector said: power, input\n"
            ),
            None => String::new(),
        },
        robot = match robot_on {
            Some(d) => format!(
                "\x20 debfleet component call {d} robot patrol laps=2  # the sample robot drives the simulated one (ROS 1)\n\
                 \x20 debfleet component show {d} robot                 # where it is: pose, waypoint, lap\n\
                 \x20 debfleet component call {d} robot stop\n\
                 \x20 debfleet component show {d} ros-bridge            # the ROS bridge: streams, publishers, the master\n\
                 \x20 debfleet component call {d} ros-bridge topics     # the robot's ROS topics and their types\n\
                 \x20 debfleet component call {d} ros-bridge publish publisher=cmd_vel 'data={{\"angular\":{{\"z\":1}}}}'\n"
            ),
            None => String::new(),
        }
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // Wait for Ctrl-C or SIGTERM, then let `services` take everything down.
    rt.block_on(async {
        tokio::spawn(async move {
            if let Err(e) = web.run(std::future::pending()).await {
                eprintln!("demo: the web console stopped: {e:#}");
            }
        });
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // The demo runs the rollout controller (`debfleet rollout run`) for the tour's rollout.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            r = crate::rollout::drive(&ctx, false) => {
                // Ok: it stopped on the same signal. An error leaves the rest of the demo running.
                if let Err(e) = r {
                    eprintln!("demo: the rollout controller stopped: {e:#}");
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    drop(services);
    let _ = std::fs::remove_dir_all(&work);
    Ok(0)
}
