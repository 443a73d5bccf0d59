//! rhyve: a virtual machine monitor whose heart is faithful, fast emulated storage.
//!
//! `rhyve uml` serves rhyve's PCI devices to User-Mode Linux over vhost-user, so the real Linux
//! nvme, ahci and virtio_blk drivers run against the device models; `rhyve run` runs a KVM virtual machine;
//! `rhyve ctl` talks to either over its API socket.

mod api;
mod devices;
mod run_cmd;
mod uml_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rhyve",
    version,
    about = "rhyve: a VMM with faithful, fast emulated storage"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve PCI devices to User-Mode Linux (virtio-pcidev over vhost-user).
    Uml(uml_cmd::UmlArgs),
    /// Run a KVM virtual machine with rhyve's devices.
    Run(run_cmd::RunArgs),
    /// Ask a running rhyve (`--api-socket`) for information, counters, or to shut down.
    Ctl(CtlArgs),
}

/// Arguments of `rhyve ctl`.
#[derive(clap::Args)]
struct CtlArgs {
    /// The API socket of the rhyve to talk to.
    #[arg(long)]
    api_socket: std::path::PathBuf,
    /// What to do: info, stats, shutdown, pause, resume, snapshot, migrate-send.
    verb: String,
    /// The verb's argument: the directory for `snapshot`, the URL for `migrate-send`.
    arg: Option<String>,
    /// A JSON body for the verb.
    #[arg(long)]
    json: Option<String>,
}

/// `rhyve ctl`: prints the JSON answer; exit code 1 when the answer is an error.
fn ctl(a: CtlArgs) -> anyhow::Result<()> {
    if !api::VERBS.contains(&a.verb.as_str()) {
        anyhow::bail!(
            "unknown verb {:?}: the verbs are {}",
            a.verb,
            api::VERBS.join(", ")
        );
    }
    let json = match (a.verb.as_str(), &a.arg, a.json) {
        (_, Some(_), Some(_)) => anyhow::bail!("give the argument or --json, not both"),
        ("migrate-send", Some(url), None) => Some(serde_json::json!({ "url": url }).to_string()),
        ("snapshot", Some(dir), None) => {
            // The server resolves paths from its own working directory: send an absolute one.
            let dir = std::path::absolute(dir)?;
            Some(serde_json::json!({ "dir": dir }).to_string())
        }
        (verb, Some(_), None) => anyhow::bail!("{verb} takes no argument"),
        (_, None, j) => j,
    };
    let (code, body) = api::request(&a.api_socket, &a.verb, json.as_deref())?;
    println!("{body}");
    if !(200..300).contains(&code) {
        eprintln!("rhyve: {} answered {code}", a.verb);
        std::process::exit(1);
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Uml(a) => uml_cmd::run(a),
        Cmd::Run(a) => run_cmd::run(a),
        Cmd::Ctl(a) => ctl(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rhyve: {e:#}");
            ExitCode::from(2)
        }
    }
}
