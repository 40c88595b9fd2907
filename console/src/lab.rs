//! `debfleet lab`: devices as systemd-nspawn containers on this machine, each running the agent
//! against the broker — for trying debfleet out and for testing packages before a fleet gets them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use debfleet_lab::{Device, Lab};

use crate::output::table;
use crate::Ctx;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Boot N devices (lab-1 ... lab-N) with the agent installed and connected to the broker.
    Up {
        /// How many devices (lab-1 ... lab-N).
        #[arg(long, default_value_t = 3)]
        devices: u32,
        /// Install the agent from this .deb ...
        #[arg(long)]
        agent_deb: Option<PathBuf>,
        /// ... or from this repository (debfleet-repo serve) with its public key.
        #[arg(long, requires = "key")]
        repo: Option<String>,
        /// The repository's public key (binary, as served at /debfleet-archive-keyring.gpg).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Groups the devices' agents join.
        #[arg(long, default_value = "lab")]
        group: String,
        /// Enroll each device in this broker configuration (debfleet broker init) and give its
        /// agent the credentials: for a broker that requires passwords.
        #[arg(long)]
        broker_dir: Option<PathBuf>,
        /// Allow remote sessions on the devices: `debfleet shell` as root (agent.toml's
        /// [remote] shell = true, user = "root").
        #[arg(long)]
        remote_shell: bool,
    },
    /// List the devices and whether they run.
    Status,
    /// Run a command on a device.
    Exec {
        /// The device's id.
        device: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Power a device off cleanly and boot it again.
    Reboot {
        /// The device's name (lab-1, ...).
        device: String,
    },
    /// Cut a device's power (everything in it dies at once).
    Kill {
        /// The device's name (lab-1, ...).
        device: String,
    },
    /// Boot a device that is off (after `kill`).
    Boot {
        /// The device's name (lab-1, ...).
        device: String,
    },
    /// Stop every device and remove everything the lab made.
    Down,
}

fn attach(lab: &Lab, name: &str) -> Result<Device> {
    lab.attach(name).with_context(|| format!("device {name}"))
}

pub fn run(ctx: &Ctx, cmd: LabCommand) -> Result<u8> {
    let lab = Lab::open();
    match cmd {
        LabCommand::Up { devices, agent_deb, repo, key, group, broker_dir, remote_shell } => {
            if devices == 0 || devices > 32 {
                bail!(crate::cmds::UsageError("--devices must be between 1 and 32".into()));
            }
            if agent_deb.is_none() && repo.is_none() {
                bail!(crate::cmds::UsageError(
                    "name --agent-deb FILE or --repo URL --key FILE to install the agent from".into()
                ));
            }
            debfleet_lab::ensure_host_packages()?;
            let mut rows = Vec::new();
            for i in 1..=devices {
                let name = format!("lab-{i}");
                let dev = match lab.attach(&name) {
                    Ok(d) => d,
                    Err(_) => {
                        eprintln!("booting {name}...");
                        lab.create(&name)?
                    }
                };
                let enroll = broker_dir.as_deref().map(|dir| (dir, group.as_str()));
                let from = Source { agent_deb: agent_deb.as_deref(), repo: repo.as_deref(), key: key.as_deref() };
                provision(&dev, ctx, &from, &group, enroll, remote_shell)
                    .with_context(|| format!("setting up {name}"))?;
                rows.push(vec![name, "running".into(), dev.pid.to_string()]);
            }
            print!("{}", table(&["DEVICE", "STATE", "INIT PID"], &rows));
            println!("the devices' agents report to {} as lab-1..lab-{devices}: try `debfleet devices`", ctx.broker);
            Ok(0)
        }
        LabCommand::Status => {
            let rows: Vec<Vec<String>> = lab
                .names()
                .into_iter()
                .map(|n| match lab.attach(&n) {
                    Ok(d) => {
                        let agent = if d.is_active("debfleet-agent.service") { "active" } else { "inactive" };
                        vec![n, "running".into(), agent.into()]
                    }
                    Err(_) => vec![n, "off".into(), "-".into()],
                })
                .collect();
            if rows.is_empty() {
                println!("no lab devices (debfleet lab up)");
            } else {
                print!("{}", table(&["DEVICE", "STATE", "AGENT"], &rows));
            }
            Ok(0)
        }
        LabCommand::Exec { device, command } => {
            let dev = attach(&lab, &device)?;
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            let out = dev.exec(&args);
            use std::io::Write;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            Ok(out.status.code().map(|c| c.clamp(0, 255) as u8).unwrap_or(crate::exit::FAILED))
        }
        LabCommand::Reboot { device } => {
            let mut dev = attach(&lab, &device)?;
            dev.reboot()?;
            println!("{device} rebooted");
            Ok(0)
        }
        LabCommand::Kill { device } => {
            let mut dev = attach(&lab, &device)?;
            dev.power_cut();
            println!("{device}: power cut");
            Ok(0)
        }
        LabCommand::Boot { device } => {
            if lab.attach(&device).is_ok() {
                println!("{device} is already running");
                return Ok(0);
            }
            if !lab.device_dir(&device).join("root").exists() {
                bail!("no lab device named {device}");
            }
            lab.create(&device)?;
            println!("{device} booted");
            Ok(0)
        }
        LabCommand::Down => {
            let gone = lab.down();
            println!(
                "removed {} device(s){}",
                gone.len(),
                if gone.is_empty() { String::new() } else { format!(": {}", gone.join(", ")) }
            );
            Ok(0)
        }
    }
}

/// Where a lab device's agent comes from: a .deb, or a repository with its key.
pub struct Source<'a> {
    pub agent_deb: Option<&'a std::path::Path>,
    pub repo: Option<&'a str>,
    pub key: Option<&'a std::path::Path>,
}

pub fn provision(
    dev: &Device,
    ctx: &Ctx,
    from: &Source<'_>,
    group: &str,
    broker_dir: Option<(&std::path::Path, &str)>,
    remote_shell: bool,
) -> Result<()> {
    let Source { agent_deb, repo, key } = *from;
    if let (Some(repo), Some(key)) = (repo, key) {
        dev.put(key, "/etc/apt/keyrings/debfleet.gpg")?;
        dev.write(
            "/etc/apt/sources.list.d/debfleet.list",
            &format!("deb [signed-by=/etc/apt/keyrings/debfleet.gpg] {}/ stable main\n", repo.trim_end_matches('/')),
        )?;
        // The lab's devices take software from the debfleet repository only.
        let _ = std::fs::remove_file(dev.root.join("etc/apt/sources.list.d/debian.sources"));
        dev.ok(&["apt-get", "update", "-q"])?;
    }
    let installed = dev.exec(&["dpkg-query", "-W", "-f=${Status}", "debfleet-agent"]);
    if !String::from_utf8_lossy(&installed.stdout).contains("install ok installed") {
        match agent_deb {
            Some(deb) => {
                dev.put(deb, "/var/tmp/debfleet-agent.deb")?;
                dev.ok(&["dpkg", "-i", "/var/tmp/debfleet-agent.deb"])?;
            }
            None => {
                dev.ok(&["apt-get", "install", "-y", "-q", "debfleet-agent"])?;
            }
        }
    }
    let mut config = format!(
        "device_id = \"{name}\"\nbroker = \"{broker}\"\nstate_dir = \"/var/lib/debfleet\"\ngroups = [\"{group}\"]\n",
        name = dev.name,
        broker = ctx.broker,
    );
    // Enrolled in the broker's configuration: a password of its own, written where the agent
    // reads it (0600, root's), never shown.
    if let Some((dir, groups)) = broker_dir {
        let mut b = crate::broker::BrokerDir::open(dir)?;
        let password = b.add_device(&dev.name, &[groups.to_owned()], false)?.context("a new password")?;
        dev.write("/etc/debfleet/broker-password", &format!("{password}\n"))?;
        dev.ok(&["chmod", "0600", "/etc/debfleet/broker-password"])?;
        config.push_str("username = \"");
        config.push_str(&dev.name);
        config.push_str("\"\npassword_file = \"/etc/debfleet/broker-password\"\n");
    }
    if remote_shell {
        config.push_str("\n[remote]\nshell = true\nuser = \"root\"\n");
    }
    dev.write("/etc/debfleet/agent.toml", &config)?;
    dev.ok(&["systemctl", "restart", "debfleet-agent"])?;
    Ok(())
}
