//! Shell completions and man pages, generated from the CLI definitions themselves so they
//! cannot drift from the commands: `debfleet completions SHELL`, and (for the packages)
//! `debfleet manpages --out DIR`, which writes `debfleet.1` and `debfleet-agent.1`.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

pub fn completions(shell: clap_complete::Shell) -> Result<u8> {
    use std::io::Write;
    let mut cmd = crate::Cli::command();
    // Into memory first: clap_complete panics on a write error (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "debfleet", &mut script);
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(0),
    }
}

/// The agent parses its three arguments by hand (it stays small); its page is described here.
fn agent_command() -> clap::Command {
    clap::Command::new("debfleet-agent")
        .version(env!("CARGO_PKG_VERSION"))
        .about("The debfleet device agent")
        .long_about(
            "Connects the device to the MQTT broker, publishes its retained self-description \
             (meta, status with a last will, cfg, package and unit state), telemetry and logs, and \
             runs the commands operators send: apt transactions, unit restarts, configuration \
             changes. Runs as the debfleet-agent systemd service; the configuration keys are in \
             /etc/debfleet/agent.toml and the README.",
        )
        .arg(
            clap::Arg::new("config")
                .long("config")
                .short('c')
                .value_name("FILE")
                .required(true)
                .help("The agent's configuration (TOML), e.g. /etc/debfleet/agent.toml"),
        )
}

pub fn manpages(out: &Path) -> Result<u8> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, cmd) in [("debfleet", crate::Cli::command()), ("debfleet-agent", agent_command())] {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        let path = out.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(0)
}
