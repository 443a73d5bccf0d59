//! The UML benchmark (filled in below).

use anyhow::Result;

/// Arguments of `rhyve-bench uml`.
#[derive(clap::Args)]
pub struct Args {}

/// Run it.
pub fn main(_a: Args) -> Result<()> {
    anyhow::bail!("not yet")
}
