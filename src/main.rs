//! rhyve: a virtual machine monitor whose heart is faithful, fast emulated storage.
//!
//! `rhyve uml` serves rhyve's PCI devices to User-Mode Linux over vhost-user, so the real Linux
//! nvme and ahci drivers run against the device models.

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
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Uml(a) => uml_cmd::run(a),
        Cmd::Run(a) => run_cmd::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rhyve: {e:#}");
            ExitCode::from(2)
        }
    }
}
